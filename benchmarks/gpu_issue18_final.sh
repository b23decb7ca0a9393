# GPU run for issue 18 (final check): the CUDA tests of the statistics pass and run_ptq, then calibration
# all-inclusive vs FP32 inference for ResNet-50 at 512 and 1,024 samples with the defaults.
#   bash benchmarks/gpu_issue18_final.sh   (repo root as cwd)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks tests pyproject.toml /tmp/ql/
cd /tmp/ql
timeout ${TESTS_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider tests/quantlab/test_ptq_cuda.py \
  tests/quantlab/test_statistics_cuda.py tests/qat/test_graphed.py tests/qat/test_sync_free_cuda.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
timeout ${CALIB_TIMEOUT:-150} python3 benchmarks/bench_calibration.py --device cuda --models ${MODELS:-resnet50} \
  --samples 512,1024 --tools quantlab --repeats 5 --calib-repeats 5 --no-agreement --batch-size 64 2>&1 \
  | tee "$OUT/calibration.md" | grep -E "^### |Statistics pass|never graphed|Physical|as run_ptq\*\*"
