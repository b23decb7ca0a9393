# GPU run for issue 18: run_ptq's statistics pass as shipped against graphs off and graphs always, ResNet-50 at
# 1,024 samples (16 batches), on the host as it is and with 3 ms of host time added per batch (a slower host);
# what each capture cost (host time of its parts, cudaMalloc calls, the GPU's idle gap).
#   bash benchmarks/gpu_issue18_capture.sh   (repo root as cwd; results under $OUT; env REPEATS, DELAYS)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu_setup.sh
cp -r benchmarks tests pyproject.toml /tmp/ql/ && cd /tmp/ql
for delay in ${DELAYS:-0 3}; do
  timeout ${CAPTURE_TIMEOUT:-150} python3 benchmarks/diagnose_graph_capture.py --device cuda --model resnet50 --samples 1024 \
    --repeats ${REPEATS:-8} --host-delay-ms $delay > "$OUT/capture-resnet50-1024-delay$delay.md" 2>&1
  echo "## resnet50 1024, host delay $delay ms"; tail -7 "$OUT/capture-resnet50-1024-delay$delay.md"
done
