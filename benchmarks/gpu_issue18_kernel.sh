# GPU runs for issue 18: the statistics kernel's launch settings and the bookkeeping around the pass.
#   STAGE=tests bash benchmarks/gpu_issue18_kernel.sh   every CUDA test, the kernel's settings side by side on
#                                                       ResNet-50's activations and in whole passes, and where a
#                                                       pass and run_calibrators spend their host time
#   STAGE=calibration bash benchmarks/gpu_issue18_kernel.sh   calibration all-inclusive vs FP32 inference
# (repo root as cwd; results under $OUT)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${STAGE:-tests}" = tests ]; then
  TESTS_TIMEOUT=${TESTS_TIMEOUT:-280} bash benchmarks/gpu_tests.sh
fi
source benchmarks/gpu_setup.sh
cp -r benchmarks tests /tmp/ql/
cd /tmp/ql
if [ "${STAGE:-tests}" = tests ]; then
  timeout ${KERNEL_TIMEOUT:-150} python3 benchmarks/bench_histogram_kernel.py --device cuda --model resnet50 --passes \
    ${KERNEL_ARGS:---variants 1:2:2048:0:0,4:2:2048:1:0,4:2:2048:1:2,8:2:2048:1:2 --pass-variants 1:2:2048:0:0,4:2:2048:1:2} 2>&1 | tee "$OUT/kernel.md" | tail -40
  timeout ${PHASES_TIMEOUT:-100} python3 benchmarks/profile_statistics.py --device cuda --model resnet50 --samples 512 --phases --host-profile \
    2>&1 | tee "$OUT/phases.md" | tail -60
else
  timeout ${CALIB_TIMEOUT:-540} python3 benchmarks/bench_calibration.py --device cuda --models ${MODELS:-resnet50,bert-base} \
    --samples 512,1024 --tools quantlab --repeats ${REPEATS:-5} --calib-repeats 5 --no-agreement --batch-size 64 2>&1 \
    | tee "$OUT/calibration.md" | tail -60
fi
