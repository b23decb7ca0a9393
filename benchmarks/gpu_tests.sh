# Every test that needs CUDA, on the GPU machine, with the whole log (CI has no GPU; RESULTS.md records the run).
#   bash benchmarks/gpu_tests.sh [extra pytest paths]   (repo root as cwd; writes $OUT/tests.log when OUT is set)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
cp -r tests pyproject.toml /tmp/ql/
(cd /tmp/ql && timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rfEs --tb=long \
  tests/qat/test_graphed.py tests/qat/test_sync_free_cuda.py tests/quantlab/test_statistics_cuda.py \
  tests/calibrators/test_many_cuda.py tests/calibrators/test_entropy.py tests/calibrators/test_mse.py \
  tests/calibrators/test_percentile.py tests/runtimes/test_cusparselt.py tests/jobs/test_compare_sparse_cuda.py \
  tests/quantlab/algorithms/test_adaround_cuda.py tests/qat/test_loop_graphs_cuda.py tests/quantlab/test_ptq_cuda.py "$@") \
  > "$OUT/tests.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/tests.log"
grep -E "passed|failed|FAILED|ERROR" "$OUT/tests.log" | tail -20
