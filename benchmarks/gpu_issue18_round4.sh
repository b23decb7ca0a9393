# GPU run for issue 18, the deferred pass (run_ptq enqueues the calibrators behind the pass; the statistics
# come back with the first ranges):
# every CUDA test, then calibration all-inclusive vs FP32 inference (bench_calibration: the two-call flow and
# run_ptq's one call, right after FP32 and after an idle pause), then the phases profile.
#   bash benchmarks/gpu_issue18_round4.sh   (repo root as cwd; results under $OUT)
# env: SKIP_TESTS=1, SKIP_PROFILE=1, MODELS (resnet50,bert-base), SAMPLES (512,1024), *_TIMEOUT
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "$SKIP_TESTS" ]; then TESTS_TIMEOUT=${TESTS_TIMEOUT:-240} bash benchmarks/gpu_tests.sh; fi
source benchmarks/gpu_setup.sh
cp -r benchmarks tests pyproject.toml /tmp/ql/ && cd /tmp/ql
timeout ${CALIB_TIMEOUT:-240} python3 benchmarks/bench_calibration.py --device cuda --models ${MODELS:-resnet50,bert-base} \
  --samples ${SAMPLES:-512,1024} --tools quantlab --repeats ${REPEATS:-5} --calib-repeats 5 --no-agreement --batch-size 64 2>&1 \
  | tee "$OUT/calibration-${MODELS:-all}.md" | grep -E "^### |End to end|As run_ptq|Physical"
if [ -z "$SKIP_PROFILE" ]; then
  timeout ${PROFILE_TIMEOUT:-90} python3 benchmarks/profile_statistics.py --device cuda --model resnet50 --samples 512 --phases \
    > "$OUT/phases.md" 2>&1; grep -v "^ " "$OUT/phases.md" | grep -A14 "Phases of one\|End to end\|wall time vs" | head -50
fi
