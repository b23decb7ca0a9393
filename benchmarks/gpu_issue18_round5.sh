# GPU run for issue 18, passes of 16 batches or more graphed and the leaner per-layer statistics path: every CUDA
# test, the pass's host time per forward against FP32
# (profile_layer_host), run_ptq as shipped / graphs off / graphs always on the host as it is and with 6 ms of host
# time added per batch (diagnose_graph_capture), then calibration all-inclusive vs FP32 inference (bench_calibration).
#   bash benchmarks/gpu_issue18_round5.sh   (repo root as cwd; results under $OUT)
# env: SKIP_TESTS=1, SKIP_DIAGNOSE=1 (neither profile_layer_host nor diagnose_graph_capture), SKIP_CAPTURE=1
# (profile_layer_host only), REPEATS
# (bench_calibration), DELAYS ("0 6"), *_TIMEOUT
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "$SKIP_TESTS" ]; then TESTS_TIMEOUT=${TESTS_TIMEOUT:-200} bash benchmarks/gpu_tests.sh | tail -3; fi
if [ -z "$SKIP_DIAGNOSE" ]; then
  LAYER_TIMEOUT=60 bash benchmarks/gpu_issue18_layer_host.sh | sed -n 5,14p
  if [ -z "$SKIP_CAPTURE" ]; then DELAYS=${DELAYS:-0 6} CAPTURE_TIMEOUT=80 bash benchmarks/gpu_issue18_capture.sh; fi
fi
SKIP_TESTS=1 SKIP_PROFILE=1 REPEATS=${REPEATS:-7} CALIB_TIMEOUT=${CALIB_TIMEOUT:-240} bash benchmarks/gpu_issue18_round4.sh
