# GPU run for issue 18 (one device call): QAT step times, eager and CUDA-graphed, beside Model Optimizer's QAT.
#   bash benchmarks/gpu_qat_modelopt.sh   (repo root as cwd; carry .whl with the wheels gpu_setup.sh lists)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r benchmarks examples /tmp/ql/
(cd /tmp/ql && timeout ${QAT_TIMEOUT:-280} python3 benchmarks/bench_qat.py --device cuda --rounds 4 --steps 15 --warmup 8 \
  --variants fp32,fp32-graphed,qat,qat-graphed,qat-lsq,qat-lsq-graphed,qat-fold-bn,qat-fold-bn-graphed,modelopt) 2>&1 | tee "$OUT/qat.md" | tail -25
