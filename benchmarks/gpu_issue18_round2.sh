# GPU run for issue 18 (calibrators' kernels, host work, shared inputs):
#   STAGE=tests bash benchmarks/gpu_issue18_round2.sh        every CUDA test, then where ResNet-50 calibration at 512
#                                                            samples spends its time (profile_statistics --phases)
#   STAGE=calibration bash benchmarks/gpu_issue18_round2.sh  calibration all-inclusive vs FP32 inference, this code,
#                                                            then the code of the session before (.whl/old) on the same machine
# (repo root as cwd; results under $OUT)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$PWD
if [ "${STAGE:-tests}" = tests ]; then
  TESTS_TIMEOUT=${TESTS_TIMEOUT:-300} bash benchmarks/gpu_tests.sh
  source benchmarks/gpu_setup.sh
  cp -r benchmarks tests /tmp/ql/ && cd /tmp/ql
  timeout ${PHASES_TIMEOUT:-200} python3 benchmarks/profile_statistics.py --device cuda --model resnet50 --samples 512 --phases \
    2>&1 | tee "$OUT/phases.md" | grep -v "^ " | tail -60
else
  source benchmarks/gpu_setup.sh
  cp -r benchmarks tests pyproject.toml /tmp/ql/ && cd /tmp/ql
  if [ -n "$TESTS" ]; then  # a short list of CUDA tests first (the full list runs in STAGE=tests)
    timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -rfE --tb=short $TESTS 2>&1 | tail -15 | tee "$OUT/tests.txt"
  fi
  timeout ${CALIB_TIMEOUT:-330} python3 benchmarks/bench_calibration.py --device cuda --models ${MODELS:-resnet50,bert-base} \
    --samples 512,1024 --tools quantlab --repeats ${REPEATS:-5} --calib-repeats 5 --no-agreement --batch-size 64 2>&1 \
    | tee "$OUT/calibration.md" | grep -E "^### |End to end|as run_ptq\*\*|Physical"
  if [ -d "$ROOT/.whl/old" ]; then
    cd "$ROOT/.whl/old" && source benchmarks/gpu_setup.sh && cp -r benchmarks /tmp/ql/ && cd /tmp/ql
    cp "$ROOT/benchmarks/bench_calibration.py" benchmarks/  # the same benchmark (end to end included)
    timeout ${OLD_TIMEOUT:-150} python3 benchmarks/bench_calibration.py --device cuda --models resnet50 --samples 512,1024 \
      --tools quantlab --repeats ${REPEATS:-5} --calib-repeats 5 --no-agreement --batch-size 64 2>&1 \
      | tee "$OUT/calibration_old.md" | grep -E "^### |End to end|as run_ptq\*\*|Physical"
  fi
  if [ -n "$HOST_PROFILE" ]; then  # where a pass's host time goes, this code
    cd "$ROOT" && source benchmarks/gpu_setup.sh && cp -r benchmarks /tmp/ql/ && cd /tmp/ql
    timeout ${PROFILE_TIMEOUT:-90} python3 benchmarks/profile_statistics.py --device cuda --model resnet50 --samples 512 \
      --phases --host-profile 2>&1 > "$OUT/host_profile.md"; grep -A45 "cProfile of one statistics pass" "$OUT/host_profile.md" | cut -c1-160
  fi
fi
