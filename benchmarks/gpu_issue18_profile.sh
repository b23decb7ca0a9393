# GPU run for issue 18: every CUDA test, then where calibration spends its time on ResNet-50 at 512 samples
# (phases of the pass, each calibrator's wall time against the GPU's own kernel time, and the pass plus the
# four calibrators end to end against FP32 inference).
#   bash benchmarks/gpu_issue18_profile.sh   (repo root as cwd; results under $OUT)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TESTS_TIMEOUT=${TESTS_TIMEOUT:-300} bash benchmarks/gpu_tests.sh
source benchmarks/gpu_setup.sh
cp -r benchmarks tests /tmp/ql/
cd /tmp/ql
timeout ${PHASES_TIMEOUT:-150} python3 benchmarks/profile_statistics.py --device cuda --model ${MODEL:-resnet50} \
  --samples ${SAMPLES:-512} --phases 2>&1 | tee "$OUT/phases.md" | grep -v "^ " | tail -45
