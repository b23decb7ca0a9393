# GPU run for issue 19: AdaRound with the Fisher-weighted loss vs the plain one on EfficientNet-Lite1, then the CUDA
# AdaRound tests.   bash benchmarks/gpu_fisher19.sh   (repo root as cwd; carry .whl)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks examples tests /tmp/ql/
(cd /tmp/ql && timeout ${EFFNET_TIMEOUT:-360} python3 benchmarks/bench_efficientnet_lite.py --device cuda --tools quantlab \
  --calibrators ${FISHER_CALIBRATORS:-max} \
  --algorithms "${FISHER_SETS:-bn-fold,adaround,bias-correction;bn-fold,adaround:loss=fisher,bias-correction}") \
  > "$OUT/fisher.md" 2> "$OUT/fisher.err"
tail -12 "$OUT/fisher.md"; tail -c 1500 "$OUT/fisher.err"
cp pyproject.toml /tmp/ql/; (cd /tmp/ql && python3 -m pytest -q -p no:cacheprovider tests/quantlab/algorithms/test_adaround_cuda.py 2>&1 | tail -5)
