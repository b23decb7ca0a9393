# GPU run for issue 18: where CUDA graphs start to pay for the statistics pass (graphs forced for every
# pass length, each beside the same pass never graphed and FP32 inference), plus the CUDA tests of the
# statistics pass and run_ptq.   bash benchmarks/gpu_issue18_graphs.sh   (repo root as cwd)
REPO=$PWD
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks tests pyproject.toml /tmp/ql/
cd /tmp/ql
timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/quantlab/test_ptq_cuda.py \
  tests/quantlab/test_statistics_cuda.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
timeout ${CALIB_TIMEOUT:-300} python3 benchmarks/bench_calibration.py --device cuda --models ${MODELS:-resnet50} \
  --samples ${SAMPLES:-512,1024,1536,2048} --tools quantlab --repeats 5 --calib-repeats 5 --no-agreement --batch-size 64 \
  --graph-min-batches 1 2>&1 | tee "$OUT/calibration.md" | grep -E "^### |Statistics pass|FP32 inference|never graphed|Physical"
# The code before this session's changes (a tree carried in .whl/old), same machine, same benchmark.
if [ -d "$REPO/.whl/old/quantlab" ]; then
  rm -rf /tmp/ql_old && mkdir -p /tmp/ql_old && cp -r "$REPO/.whl/old/quantlab" /tmp/ql_old/
  cp -r "$REPO/.whl/old/calibrators" /tmp/ql_old/quantlab/calibrators && cp -r "$REPO/.whl/old/qat" /tmp/ql_old/quantlab/qat
  cp -r "$REPO/.whl/old/ui" /tmp/ql_old/quantlab/ui
  PYTHONPATH=/tmp/ql_old:/tmp/site timeout ${OLD_TIMEOUT:-150} python3 benchmarks/bench_calibration.py --device cuda --models resnet50 \
    --samples 512,1024 --tools quantlab --repeats 5 --calib-repeats 5 --no-agreement --batch-size 64 2>&1 \
    | tee "$OUT/calibration_old.md" | grep -E "^### |Statistics pass|never graphed|Physical|as run_ptq"
fi
