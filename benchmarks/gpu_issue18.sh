# GPU run for issue 18 (one device call): CUDA tests, then calibration all-inclusive and QAT step times.
#   bash benchmarks/gpu_issue18.sh   (repo root as cwd; writes logs to $OUT when set)
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# The tests import quantlab from the mirrored layout in /tmp/ql (gpu_setup.sh).
cp -r tests pyproject.toml /tmp/ql/
(cd /tmp/ql && timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/qat/test_graphed.py tests/qat/test_sync_free_cuda.py \
  tests/quantlab/test_statistics_cuda.py tests/calibrators/test_many_cuda.py tests/runtimes/test_cusparselt.py 2>&1 | tail -25) | tee "$OUT/tests.log"
timeout 200 python3 benchmarks/bench_calibration.py --device cuda --models resnet50,bert-base --samples 512,1024 --tools quantlab \
  --repeats 5 --calib-repeats 5 --no-agreement --batch-size 64 2>&1 | tee "$OUT/calibration.md" | tail -30
timeout 200 python3 benchmarks/bench_qat.py --device cuda --rounds 4 --steps 15 --warmup 8 \
  --variants fp32,fp32-graphed,qat,qat-graphed,qat-lsq,qat-lsq-graphed,qat-fold-bn,qat-fold-bn-graphed 2>&1 | tee "$OUT/qat.md" | tail -20
