# GPU run for issue 18: the statistics pass's host work per forward against FP32 (ResNet-50 on a tiny input, so the
# GPU waits on the host), parts of the per-layer path skipped one at a time, and a cProfile of it.
#   bash benchmarks/gpu_issue18_layer_host.sh   (repo root as cwd; results under $OUT)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_setup.sh
cp -r benchmarks tests pyproject.toml /tmp/ql/ && cd /tmp/ql
timeout ${LAYER_TIMEOUT:-200} python3 benchmarks/profile_layer_host.py --device cuda --model resnet50 ${LAYER_ARGS} \
  > "$OUT/layer-host.md" 2>&1; head -60 "$OUT/layer-host.md"
