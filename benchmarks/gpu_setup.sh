# Source this on a fresh GPU machine (repo root as cwd) before running the benchmarks there:
#   source benchmarks/gpu_setup.sh
# It makes quantlab importable without a build step, installs wheels carried in .whl/
# and points quantlab at Fashion-MNIST files carried in .whl/fmnist/. Fetch the wheels here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl nvidia-modelopt==0.47.0 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 omegaconf==2.4.0 pulp==3.3.2
# (the GPU image lacks pydantic, omegaconf and pulp, which modelopt imports).
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
