# GPU run for issue 18: where a slow statistics pass loses its time (per batch: host enqueue vs GPU done),
# FP32 (no quantizers) and run_ptq (eager, eager with the per-layer host path before 2026-12-03, graphed) interleaved, ResNet-50 at
# 512 and 1,024 samples, BERT-base at 512; optionally the CUDA tests of the statistics pass and graphs first.
#   bash benchmarks/gpu_issue18_spread.sh   (repo root as cwd; results under $OUT; env TESTS=1, REPEATS)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -n "$TESTS" ]; then TESTS_TIMEOUT=${TESTS_TIMEOUT:-240} bash benchmarks/gpu_tests.sh; fi
source benchmarks/gpu_setup.sh
cp -r benchmarks tests pyproject.toml /tmp/ql/ && cd /tmp/ql
for case in resnet50:512 resnet50:1024 bert-base:512; do
  model=${case%%:*}; n=${case##*:}
  timeout ${SPREAD_TIMEOUT:-150} python3 benchmarks/diagnose_pass_spread.py --device cuda --model $model --samples $n \
    --repeats ${REPEATS:-10} > "$OUT/spread-$model-$n.md" 2>&1; echo "## $model $n"; tail -8 "$OUT/spread-$model-$n.md"
done
