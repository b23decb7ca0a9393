"""Compiles quantlab's run-time CUDA kernels with NVRTC, without a GPU (a check before a GPU run).

quantlab compiles its kernels on the user's GPU at run time (PyTorch's NVRTC helpers), so a
syntax or template error only shows there. This compiles every kernel source for a given
architecture with an NVRTC library from the ``nvidia-cuda-nvrtc-cu12`` wheel, with the options
PyTorch passes, and prints NVRTC's log for any that fails.

    pip download --no-deps -d /tmp/nvrtc nvidia-cuda-nvrtc-cu12 && unzip -q -o /tmp/nvrtc/*.whl -d /tmp/nvrtc/x
    python scripts/nvrtc_check.py --lib /tmp/nvrtc/x/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 --arch 90
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
# Flags PyTorch adds to every NVRTC compile (torch.cuda._utils._get_gpu_rtc_compatible_flags).
TORCH_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def sources() -> Iterator[Tuple[str, str]]:
    """(name, source) of every kernel program, with each setting of the statistics kernels."""
    sys.path.insert(0, str(ROOT))
    from quantlab.kernels import histogram_cuda as H

    for name in ("mse_cuda.py", "entropy_cuda.py"):
        text = (ROOT / "calibrators" / name).read_text()
        start = text.index('_SOURCE = r"""') + len('_SOURCE = r"""')
        yield f"calibrators/{name}", text[start:text.index('"""', start)]
    for unroll, vote, load in itertools.product((1, 4, 8), (0, 1), (0, 1, 2)):
        defines = H.source_defines(unroll, bool(vote), load)
        yield f"histogram_cuda (unroll {unroll}, group vote {vote}, load {load})", defines + H._SOURCE


def compile_source(lib: ctypes.CDLL, source: str, arch: str) -> Tuple[int, str]:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"check.cu", 0, None, None):
        return -1, "nvrtcCreateProgram failed"
    options: List[bytes] = [f"--gpu-architecture=sm_{arch}".encode()] + [f.encode() for f in TORCH_FLAGS]
    result = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True, help="path of libnvrtc.so")
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90: H100/H200)")
    args = parser.parse_args()
    lib = ctypes.CDLL(args.lib)
    failed = 0
    for name, source in sources():
        result, log = compile_source(lib, source, args.arch)
        status = "ok" if result == 0 else f"FAILED ({result})"
        sys.stdout.write(f"{status:12} {name}\n")
        if result != 0 or "warning" in log:
            sys.stdout.write(log + "\n")
        failed += result != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
