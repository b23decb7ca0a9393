"""Building TensorRT engines from quantlab's ONNX files (strongly typed networks).

Written against TensorRT's documented Python API (10.12+ and 11.x): the
precision of every layer comes from the ONNX graph (Q/DQ nodes, FP16
initializers), never from builder flags, which TensorRT 11 removed::

    Builder -> create_network(STRONGLY_TYPED) -> OnnxParser -> BuilderConfig
            -> build_serialized_network -> plan file

TensorRT is not installable on the machines quantlab is developed on, so this
module is NOT tested here; where ``tensorrt`` cannot be imported every entry
point raises :class:`TensorRTUnavailableError` with install instructions, and
:func:`trtexec_command` gives the equivalent ``trtexec`` command line, which
needs nothing but the ONNX file.
"""
from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from quantlab._io import write_bytes_atomic
from quantlab.errors import QuantlabError

INSTALL_HINT = (
    "TensorRT is not installed (import tensorrt failed). Install it on a machine with an NVIDIA GPU: "
    "pip install --extra-index-url https://pypi.nvidia.com tensorrt  (PyPI alone holds only placeholders), "
    "or use the NGC TensorRT container. Without TensorRT, `quantlab build --print-trtexec` prints the "
    "equivalent trtexec command."
)
DEFAULT_WORKSPACE_MIB = 1024


class TensorRTUnavailableError(QuantlabError, ImportError):
    """``tensorrt`` cannot be imported (or no CUDA device is available)."""


class EngineBuildError(QuantlabError):
    """TensorRT's parser or builder rejected the model; the message lists the nodes."""


def import_tensorrt():
    """Imports ``tensorrt`` or raises :class:`TensorRTUnavailableError` with install instructions."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising OSError
        raise TensorRTUnavailableError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from None
    return tensorrt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How to build an engine.

    Attributes:
        min_batch / opt_batch / max_batch: Optimization profile of the dynamic batch dimension.
        workspace_mib: Workspace memory pool limit.
        timing_cache: File to read/write the timing cache (rebuilds get much faster).
        tf32: Allow TF32 for FP32 layers (TensorRT's default); False gives a true FP32 baseline.
        strongly_typed: Set the STRONGLY_TYPED network flag (required on 10.x, implied on 11).
        verbose: TensorRT logger at VERBOSE instead of WARNING.
        sparse_weights: Let TensorRT use 2:4 sparse kernels for weights that hold the pattern
            (``BuilderFlag.SPARSE_WEIGHTS``, trtexec ``--sparsity=enable``). Written against
            TensorRT's documented API; not verified here (no TensorRT on these machines).
    """

    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: Optional[str] = None
    tf32: bool = True
    strongly_typed: bool = True
    verbose: bool = False
    sparse_weights: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mib <= 0:
            raise ValueError(f"workspace_mib must be > 0, got {self.workspace_mib}")


@dataclasses.dataclass
class BuildResult:
    plan: Path
    seconds: float
    plan_bytes: int
    timing_cache: Optional[Path]
    tensorrt_version: str


def onnx_input_shapes(onnx_path: Union[str, Path]) -> Dict[str, List[Union[int, str]]]:
    """Input shapes of an ONNX file: ints for static dims, names for symbolic ones."""
    from quantlab.export.graph import load_onnx

    model = load_onnx(onnx_path, check=False)
    initializers = {t.name for t in model.graph.initializer}
    shapes: Dict[str, List[Union[int, str]]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return shapes


def profile_shapes(onnx_path: Union[str, Path], options: BuildOptions) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]:
    """(min, opt, max) shape per input: the batch dimension varies, all others must be static.

    Raises:
        EngineBuildError: an input has a symbolic dimension other than the first.
    """
    out = {}
    for name, dims in onnx_input_shapes(onnx_path).items():
        if not dims:
            out[name] = ((), (), ())
            continue
        rest = dims[1:]
        if any(not isinstance(d, int) or d <= 0 for d in rest):
            raise EngineBuildError(f"{onnx_path}: input '{name}' has dynamic non-batch dimensions {dims}; export with static shapes except the batch")
        if isinstance(dims[0], int) and dims[0] > 0:
            shape = tuple([dims[0]] + rest)
            out[name] = (shape, shape, shape)
        else:
            out[name] = tuple(tuple([b] + rest) for b in (options.min_batch, options.opt_batch, options.max_batch))
    return out


def trtexec_command(onnx_path: Union[str, Path], plan_path: Union[str, Path], options: BuildOptions = BuildOptions(), *, trt_major: int = 10) -> List[str]:
    """The ``trtexec`` command that builds the same engine.

    Args:
        onnx_path: The ONNX model (Q/DQ INT8, FP16 or FP32).
        plan_path: Where trtexec saves the engine.
        options: Profile, workspace, timing cache, TF32, 2:4 sparse weights.
        trt_major: 10 adds ``--stronglyTyped`` (TensorRT 11 is always strongly typed).
    """
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}"]
    if trt_major < 11 and options.strongly_typed:
        cmd.append("--stronglyTyped")
    shapes = profile_shapes(onnx_path, options)
    dynamic = {n: s for n, s in shapes.items() if s[0] != s[2]}
    if dynamic:
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            cmd.append(flag + "=" + ",".join(f"{name}:{'x'.join(str(d) for d in s[index])}" for name, s in dynamic.items()))
    cmd.append(f"--memPoolSize=workspace:{options.workspace_mib}M")
    if options.timing_cache:
        cmd.append(f"--timingCacheFile={options.timing_cache}")
    if not options.tf32:
        cmd.append("--noTF32")
    if options.sparse_weights:
        cmd.append("--sparsity=enable")  # 2:4 sparse kernels where the weights hold the pattern (unverified here)
    return cmd


def format_command(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _parser_errors(parser: Any, onnx_path: Path) -> List[str]:
    """Parser errors with the ONNX node name and operator of each."""
    from quantlab.export.graph import load_onnx

    try:
        nodes = list(load_onnx(onnx_path, check=False).graph.node)
    except Exception:  # noqa: BLE001 - the error list matters more than the names
        nodes = []
    messages = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index = int(error.node()) if hasattr(error, "node") else -1
        name = error.node_name() if hasattr(error, "node_name") else ""
        op = error.node_operator() if hasattr(error, "node_operator") else ""
        if not name and 0 <= index < len(nodes):
            name, op = nodes[index].name, nodes[index].op_type
        where = f"node {index} '{name}' ({op})" if index >= 0 else "graph"
        messages.append(f"{where}: {error.desc()} [{error.code()}]")
    return messages


def build_engine(onnx_path: Union[str, Path], plan_path: Union[str, Path], options: BuildOptions = BuildOptions()) -> BuildResult:
    """Builds a strongly typed engine from an ONNX file and writes the plan atomically.

    Raises:
        TensorRTUnavailableError: ``tensorrt`` is not installed.
        FileNotFoundError / OnnxFormatError: unreadable ONNX file.
        EngineBuildError: parser errors (with node names) or a failed build; no plan is written.
    """
    from quantlab.export.graph import load_onnx

    from quantlab.outputs import ENGINE_FILE, check_output_file

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    check_output_file(plan_path, label="plan", inputs={"the ONNX model": onnx_path, "the timing cache": options.timing_cache},
                      replace=ENGINE_FILE)
    load_onnx(onnx_path, check=False)  # clear error for a missing or non-ONNX file before TensorRT
    trt = import_tensorrt()
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if options.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser, onnx_path)
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser failed ({len(errors)} error(s)):\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    shapes = profile_shapes(onnx_path, options)
    if any(s[0] != s[2] for s in shapes.values()):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above; try --verbose)")
    data = bytes(plan)
    write_bytes_atomic(plan_path, data)
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return BuildResult(plan_path, time.perf_counter() - start, len(data), cache_path, str(trt.__version__))


__all__ = [
    "BuildOptions",
    "BuildResult",
    "EngineBuildError",
    "INSTALL_HINT",
    "TensorRTUnavailableError",
    "build_engine",
    "format_command",
    "import_tensorrt",
    "onnx_input_shapes",
    "profile_shapes",
    "tensorrt_available",
    "trtexec_command",
]
