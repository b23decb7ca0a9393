"""Finding cuSPARSELt, building quantlab's C shim against it once, and loading it with ctypes.

The shim (``shim.cpp`` beside this file) is compiled on first use with the host C++
compiler against the ``cusparseLt.h`` that ships with the library found (so struct
sizes and enum values always match), linked to that library, and cached under
``$QUANTLAB_CACHE`` (default ``~/.cache/quantlab``) by a hash of the source, the
header and the library path. Where CUDA, the library, its header or a compiler is
missing, :func:`load_library` raises :class:`CuSparseLtUnavailableError` saying
which and how to get it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from quantlab._io import atomic_path
from quantlab.errors import QuantlabError

SHIM_SOURCE = Path(__file__).with_name("shim.cpp")
#: pip distributions that ship libcusparseLt and its header (CUDA 13, 12, unversioned).
DISTRIBUTIONS = ("nvidia-cusparselt-cu13", "nvidia-cusparselt-cu12", "nvidia-cusparselt")
INSTALL_HINT = (
    "install cuSPARSELt for your CUDA major version (pip install nvidia-cusparselt-cu13, or -cu12; "
    "PyTorch's CUDA wheels already depend on it) or point QUANTLAB_CUSPARSELT_ROOT at a folder "
    "with include/cusparseLt.h and lib/libcusparseLt.so*"
)


class CuSparseLtUnavailableError(QuantlabError, ImportError):
    """cuSPARSELt cannot be used here (no CUDA GPU, library, header or compiler); the message says which."""


class CuSparseLtError(QuantlabError, RuntimeError):
    """A cuSPARSELt call failed (the message names the call and its status)."""


@dataclasses.dataclass(frozen=True)
class CuSparseLtPaths:
    """Where the header and the shared library are."""

    include_dir: Path
    library: Path
    cuda_include_dirs: tuple


def _dist_files(name: str) -> List[Path]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(dist.locate_file(f)) for f in (dist.files or [])]


def _find_in(paths: Sequence[Path]) -> "tuple[Optional[Path], Optional[Path]]":
    header = next((p.parent for p in paths if p.name == "cusparseLt.h" and p.is_file()), None)
    libs = sorted((p for p in paths if p.name.startswith("libcusparseLt.so") and p.is_file()), key=lambda p: len(p.name))
    return header, (libs[0] if libs else None)


def _root_candidates() -> List[Path]:
    roots = [os.environ.get(v) for v in ("QUANTLAB_CUSPARSELT_ROOT", "CUSPARSELT_ROOT", "CUSPARSELT_PATH")]
    roots += [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", "/usr"]
    return [Path(r) for r in roots if r]


def cuda_include_dirs() -> List[Path]:
    """Folders holding ``driver_types.h`` and ``library_types.h`` (the CUDA runtime headers)."""
    dirs: List[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent.parent / "include")
    for root in _root_candidates():
        dirs.append(root / "include")
    for dist in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12", "nvidia-cuda-crt",
                 "nvidia-cuda-nvcc", "nvidia-cuda-nvcc-cu13", "nvidia-cuda-nvcc-cu12"):
        dirs += sorted({p.parent for p in _dist_files(dist) if p.name in ("driver_types.h", "host_defines.h")})
    seen, out = set(), []
    for d in dirs:
        # host_defines.h lives in <include>/crt: the include root is one level up.
        d = d.parent if d.name == "crt" else d
        if d not in seen and d.is_dir():
            seen.add(d)
            out.append(d)
    return out


def find_cusparselt() -> CuSparseLtPaths:
    """Locates ``cusparseLt.h`` and ``libcusparseLt.so``.

    Looks in ``$QUANTLAB_CUSPARSELT_ROOT`` (and ``CUSPARSELT_ROOT``/``CUSPARSELT_PATH``),
    then the pip distributions (``nvidia-cusparselt-cu13``, ``-cu12``), then CUDA's folders.

    Raises:
        CuSparseLtUnavailableError: the header or the library was not found.
    """
    found_header: Optional[Path] = None
    found_lib: Optional[Path] = None
    searched = []
    for root in _root_candidates():
        searched.append(str(root))
        files = [root / sub / name for sub in ("include", "lib", "lib64", "lib/x86_64-linux-gnu", "include/x86_64-linux-gnu")
                 for name in ("cusparseLt.h", "libcusparseLt.so", "libcusparseLt.so.0")]
        header, lib = _find_in(files)
        found_header, found_lib = found_header or header, found_lib or lib
        if found_header and found_lib:
            break
    if not (found_header and found_lib):
        for dist in DISTRIBUTIONS:
            files = _dist_files(dist)
            if files:
                searched.append(f"pip:{dist}")
            header, lib = _find_in(files)
            found_header, found_lib = found_header or header, found_lib or lib
            if found_header and found_lib:
                break
    if not found_lib:
        raise CuSparseLtUnavailableError(f"libcusparseLt.so not found (searched {', '.join(searched) or 'nothing'}): {INSTALL_HINT}")
    if not found_header:
        raise CuSparseLtUnavailableError(
            f"found {found_lib} but not its header cusparseLt.h (searched {', '.join(searched)}): {INSTALL_HINT}"
        )
    return CuSparseLtPaths(found_header, found_lib, tuple(cuda_include_dirs()))


def cache_dir() -> Path:
    base = os.environ.get("QUANTLAB_CACHE")
    return Path(base) / "cusparselt" if base else Path.home() / ".cache" / "quantlab" / "cusparselt"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise CuSparseLtUnavailableError("no C++ compiler found (set CXX or install g++): the cuSPARSELt shim is built on first use")


def build_shim(paths: CuSparseLtPaths, out_dir: Optional[Path] = None) -> Path:
    """Compiles ``shim.cpp`` against ``paths`` (once; cached by content hash) and returns the .so path.

    Raises:
        CuSparseLtUnavailableError: no compiler, or the build failed (the compiler's message is included).
    """
    header = paths.include_dir / "cusparseLt.h"
    digest = hashlib.sha256()
    for part in (SHIM_SOURCE.read_bytes(), header.read_bytes(), str(paths.library.resolve()).encode()):
        digest.update(part)
    out_dir = out_dir or cache_dir()
    target = out_dir / f"libquantlab_cusparselt-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    includes = list(dict.fromkeys([paths.include_dir, *paths.cuda_include_dirs]))  # the first error first
    with atomic_path(target) as tmp:
        cmd = [_compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", str(SHIM_SOURCE)]
        cmd += [f"-I{d}" for d in includes]
        # Linked to the very file found, with no undefined symbol left: a library too old for the
        # shim fails here, with the linker's message, instead of aborting the process at a call.
        cmd += [str(paths.library), f"-Wl,-rpath,{paths.library.parent}", "-Wl,--no-undefined", "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CuSparseLtUnavailableError(
                f"building the cuSPARSELt shim failed ({' '.join(cmd)}):\n{(proc.stderr or proc.stdout).strip()[:2000]}"
            )
    return target


_LOCK = threading.Lock()
_LIBRARY: Optional["CuSparseLt"] = None


class CuSparseLt:
    """The loaded shim: typed entry points and the library's version."""

    def __init__(self, path: Path, paths: CuSparseLtPaths) -> None:
        self.path = path
        self.paths = paths
        # The library first, globally, so the shim's dependency resolves to this very file.
        self._cusparselt = ctypes.CDLL(str(paths.library), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(path))
        vp, i64, c_int, size_p = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)
        signatures = {
            "qlcs_last_error": ([], ctypes.c_char_p),
            "qlcs_header_version": ([], c_int),
            "qlcs_init": ([ctypes.POINTER(c_int)], c_int),
            "qlcs_plan_create": ([i64, i64, i64, c_int, c_int, vp, ctypes.POINTER(vp)], c_int),
            "qlcs_plan_sizes": ([vp, size_p, size_p, size_p], c_int),
            "qlcs_prune_check": ([vp, vp, vp, vp], c_int),
            "qlcs_compress": ([vp, vp, vp, vp, vp], c_int),
            "qlcs_search": ([vp, vp, vp, vp, vp, vp, vp, ctypes.POINTER(c_int), size_p], c_int),
            "qlcs_matmul": ([vp, vp, vp, vp, vp, vp, vp], c_int),
            "qlcs_plan_destroy": ([vp], None),
        }
        for name, (args, res) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        self.lib = lib
        version = ctypes.c_int(0)
        self.check(lib.qlcs_init(ctypes.byref(version)), "cusparseLtInit")
        self.version = int(version.value)
        self.header_version = int(lib.qlcs_header_version())

    def check(self, rc: int, what: str) -> None:
        """Raises :class:`CuSparseLtError` for a non-zero shim return code."""
        if rc != 0:
            detail = (self.lib.qlcs_last_error() or b"").decode(errors="replace")
            raise CuSparseLtError(f"{what}: {detail or f'error {rc}'}")

    @property
    def version_string(self) -> str:
        # major * 1000000 + minor * 100 + patch (older releases: major * 1000 + ...; major is 0 in both).
        v = self.version
        return f"{v // 1000000}.{(v % 1000000) // 100}.{v % 100}"


def load_library() -> CuSparseLt:
    """The shim, built and loaded once per process.

    Raises:
        CuSparseLtUnavailableError: no CUDA GPU, no cuSPARSELt (library or header), no compiler,
            or a build/load failure; the message says which and how to fix it.
    """
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is not None:
            return _LIBRARY
        import torch

        if not torch.cuda.is_available():
            raise CuSparseLtUnavailableError(
                "the 2:4 sparse runner needs an NVIDIA GPU (Ampere or newer) with CUDA: torch.cuda.is_available() is False here"
            )
        major, _ = torch.cuda.get_device_capability()
        if major < 8:
            raise CuSparseLtUnavailableError(
                f"2:4 sparse Tensor Cores need compute capability 8.0 or newer; {torch.cuda.get_device_name()} is {major}.x"
            )
        torch.cuda.init()
        paths = find_cusparselt()
        path = build_shim(paths)
        try:
            _LIBRARY = CuSparseLt(path, paths)
        except OSError as exc:
            raise CuSparseLtUnavailableError(f"loading {path} (built against {paths.library}) failed: {exc}") from None
        return _LIBRARY


def cusparselt_available() -> bool:
    """True where :func:`load_library` succeeds."""
    try:
        load_library()
    except CuSparseLtUnavailableError:
        return False
    return True


__all__ = [
    "CuSparseLt", "CuSparseLtError", "CuSparseLtPaths", "CuSparseLtUnavailableError", "build_shim", "cache_dir",
    "cuda_include_dirs", "cusparselt_available", "find_cusparselt", "load_library",
]
