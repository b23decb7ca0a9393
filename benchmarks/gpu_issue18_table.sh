# GPU run for issue 18's one table (one device call, one host): calibration all-inclusive vs FP32 inference for
# ResNet-50 and BERT-base at 512 and 1,024 samples (bench_calibration), QAT step times eager and graphed beside Model
# Optimizer's QAT (bench_qat), and the built-in QAT loop eager vs graphed (bench_qat_loop), side by side on one machine.
#   bash benchmarks/gpu_issue18_table.sh   (repo root as cwd; carry .whl with the wheels gpu_setup.sh lists)
# env: REPEATS (bench_calibration, default 9), CALIB_TIMEOUT, QAT_TIMEOUT, LOOP_TIMEOUT; results under $OUT
source benchmarks/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())" | tee -a "$OUT/gpu.txt"
lscpu | grep -E "^Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
cp -r benchmarks tests pyproject.toml examples /tmp/ql/
cd /tmp/ql
date -u +"calibration start %H:%M:%S UTC" | tee -a "$OUT/gpu.txt"
timeout ${CALIB_TIMEOUT:-260} python3 benchmarks/bench_calibration.py --device cuda --models resnet50,bert-base \
  --samples 512,1024 --tools quantlab --repeats ${REPEATS:-9} --calib-repeats 3 --no-agreement --batch-size 64 \
  > "$OUT/calibration.md" 2>&1
echo "calibration exit $?"; grep -E "^### |As run_ptq" "$OUT/calibration.md" | cut -c1-400
date -u +"qat start %H:%M:%S UTC" | tee -a "$OUT/gpu.txt"
timeout ${QAT_TIMEOUT:-170} python3 benchmarks/bench_qat.py --device cuda --rounds 4 --steps 15 --warmup 8 \
  --variants fp32,fp32-graphed,qat,qat-graphed,qat-lsq,qat-lsq-graphed,qat-fold-bn,qat-fold-bn-graphed,modelopt \
  > "$OUT/qat.md" 2>&1
echo "qat exit $?"; grep "^|" "$OUT/qat.md" | head -14
date -u +"loop start %H:%M:%S UTC" | tee -a "$OUT/gpu.txt"
timeout ${LOOP_TIMEOUT:-120} python3 benchmarks/bench_qat_loop.py --device cuda > "$OUT/qat_loop.md" 2>&1
echo "loop exit $?"; grep "^|" "$OUT/qat_loop.md" | head -12
date -u +"end %H:%M:%S UTC" | tee -a "$OUT/gpu.txt"
