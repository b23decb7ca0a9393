# GPU run for issue 19: AdaRound with QDrop (input quantization dropped per element with probability 1/2 during the
# optimization) vs plain, EfficientNet-Lite1; then the CUDA AdaRound tests.   bash benchmarks/gpu_qdrop19.sh (carry .whl)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks examples tests pyproject.toml /tmp/ql/
(cd /tmp/ql && timeout ${EFFNET_TIMEOUT:-360} python3 benchmarks/bench_efficientnet_lite.py --device cuda --tools quantlab \
  --calibrators ${QDROP_CALIBRATORS:-max} \
  --algorithms "${QDROP_SETS:-bn-fold,adaround:qdrop=true,bias-correction}") > "$OUT/qdrop.md" 2> "$OUT/qdrop.err"
tail -12 "$OUT/qdrop.md"; tail -c 1500 "$OUT/qdrop.err"
(cd /tmp/ql && python3 -m pytest -q -p no:cacheprovider tests/quantlab/algorithms/test_adaround_cuda.py 2>&1 | tail -5)
