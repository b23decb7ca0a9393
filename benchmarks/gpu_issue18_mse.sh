# GPU run for issue 18 (one device call): the CUDA tests (the mse kernel vs the torch-op blocks, bit for bit
# against the per-tensor calibrators), then calibration all-inclusive vs FP32 inference with the per-calibrator
# times (batched vs per-tensor).
#   bash benchmarks/gpu_issue18_mse.sh   (repo root as cwd)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TESTS_TIMEOUT=${TESTS_TIMEOUT:-200} bash benchmarks/gpu_tests.sh
cp -r benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout ${CALIB_TIMEOUT:-300} python3 benchmarks/bench_calibration.py --device cuda --models resnet50,bert-base \
  --samples 512,1024 --tools quantlab --repeats 5 --calib-repeats 5 --compare-per-tensor --no-agreement --batch-size 64) 2>&1 \
  | tee "$OUT/calibration.md" | tail -40
