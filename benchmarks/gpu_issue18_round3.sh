# GPU run for issue 18: every CUDA test, calibration all-inclusive vs FP32 inference (bench_calibration, end to
# end), and where run_calibrators spends its time (profile_statistics --phases).
#   bash benchmarks/gpu_issue18_round3.sh   (repo root as cwd; results under $OUT)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "$SKIP_TESTS" ]; then TESTS_TIMEOUT=${TESTS_TIMEOUT:-200} bash benchmarks/gpu_tests.sh; fi
source benchmarks/gpu_setup.sh
cp -r benchmarks tests pyproject.toml /tmp/ql/ && cd /tmp/ql
timeout ${CALIB_TIMEOUT:-200} python3 benchmarks/bench_calibration.py --device cuda --models ${MODELS:-resnet50,bert-base} \
  --samples ${SAMPLES:-512,1024} --tools quantlab --repeats ${REPEATS:-5} --calib-repeats 5 --no-agreement --batch-size 64 2>&1 \
  | tee "$OUT/calibration.md" | grep -E "^### |End to end|as run_ptq\*\*|Physical"
timeout ${PROFILE_TIMEOUT:-80} python3 benchmarks/profile_statistics.py --device cuda --model resnet50 --samples 512 --phases \
  > "$OUT/phases.md" 2>&1; grep -v "^ " "$OUT/phases.md" | grep -A12 "Phases of one\|wall time vs" | head -40
