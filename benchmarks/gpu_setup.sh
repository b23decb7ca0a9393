# Source this on a fresh GPU machine (repo root as cwd) before running the benchmarks there:
#   source benchmarks/gpu_setup.sh
# It makes quantlab importable without a build step, installs wheels carried in .whl/
# (nvidia-modelopt and its pure-Python needs; fetch them with pip download, see
# benchmarks/README.md) and points quantlab at carried Fashion-MNIST files.
set -e
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
# quantlab's package layout maps quantlab.calibrators/qat/ui to top-level folders: mirror it.
rm -rf /tmp/ql && mkdir -p /tmp/ql
cp -r quantlab /tmp/ql/ && cp -r calibrators /tmp/ql/quantlab/calibrators && cp -r qat /tmp/ql/quantlab/qat && cp -r ui /tmp/ql/quantlab/ui
export PYTHONPATH=/tmp/ql:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -d .whl/fmnist ]; then export QUANTLAB_FMNIST_DIR=$PWD/.whl/fmnist; fi
export QUANTLAB_CACHE=${QUANTLAB_CACHE:-/tmp/qlcache}
set +e
