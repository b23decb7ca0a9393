# GPU run for issue 18's built-in loop (one device call): its CUDA tests, then eager vs graphed loop step times.
#   bash benchmarks/gpu_qat_loop.sh   (repo root as cwd; writes logs to $OUT when set; ~2 min on an H200)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
cp -r tests pyproject.toml benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short \
  tests/qat/test_loop_graphs_cuda.py tests/qat/test_graphed.py \
  tests/quantlab/test_statistics_cuda.py::test_a_failed_capture_leaves_random_numbers_working) > "$OUT/tests.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/tests.log"
grep -E "passed|failed|FAILED|ERROR" "$OUT/tests.log" | tail -20
(cd /tmp/ql && timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_qat_loop.py --device cuda) 2>&1 | tee "$OUT/qat_loop.md" | tail -15
