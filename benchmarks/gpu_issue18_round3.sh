# GPU run for issue 18 (2026-12-03 11:22, RESULTS.md): every CUDA test, calibration all-inclusive vs FP32 inference
# and the phases profile. Superseded by gpu_issue18_round4.sh, which runs the same steps (and times run_ptq's one
# call too); kept as the name RESULTS.md cites.
#   bash benchmarks/gpu_issue18_round3.sh   (repo root as cwd; results under $OUT)
exec bash "$(dirname "$0")/gpu_issue18_round4.sh" "$@"
