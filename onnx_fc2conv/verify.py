"""Prove a converted model equal to its original with onnxruntime.

Both models run on the same provider with graph optimisations off, on seeded
random inputs (batch 2 where the batch dim is free), several runs, or on the
user's inputs. Every output is compared elementwise with atol and rtol
together: ``|conv - orig| <= atol + rtol * |orig|``. A Conv with a 7x7 kernel
and a Gemm sum in different orders, so the error is never exactly zero; the
report gives max/mean/p99 absolute and relative error, the worst element and
the smallest tolerance that would have passed (as Polygraphy does).

Default tolerances follow the output dtype. The default atol scales with the
output's magnitude (``atol = a0 * max(1, max|orig|)``) because a sum's
rounding error grows with the size of its terms, not of its result.

Quantized outputs are compared in quantization steps: a value that sums in
another order may land on the other side of a rounding boundary of a
requantization (QuantizeLinear, QLinearConv), so an integer output of a
quantized type (int8/uint8/int16/uint16) may differ by one step (1), and a
requantized float output, the DequantizeLinear of a constant scale, by one
step of that scale. The report gives the measured maximum in steps. Other
integer outputs are compared exactly, other float outputs (a float result
computed from dequantized values) with the float tolerances.
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .errors import Fc2ConvError

log = logging.getLogger(__name__)

# (atol base, rtol) per ONNX element type
DEFAULT_TOLERANCES = {
    onnx.TensorProto.FLOAT: (1e-5, 1e-4),
    onnx.TensorProto.DOUBLE: (1e-12, 1e-10),
    onnx.TensorProto.FLOAT16: (2e-3, 1e-2),
    onnx.TensorProto.BFLOAT16: (2e-2, 5e-2),
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# integer types that hold quantized values: one step is 1
QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16}
STEP_TOLERANCE = 1.0 + 1e-3    # one step, measured in float (a step of a float scale is not exactly it)


@dataclass
class OutputReport:
    name: str
    shape: list
    dtype: str
    passed: bool
    atol: float
    rtol: float
    max_abs: float = 0.0
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    max_rel: float = 0.0
    worst_index: list = field(default_factory=list)
    worst_expected: float = 0.0
    worst_actual: float = 0.0
    min_atol: float = 0.0          # smallest atol that passes at this rtol
    min_rtol: float = 0.0          # smallest rtol that passes at this atol
    mismatches: int = 0
    message: str = ""
    steps: float | None = None     # quantized outputs: the largest difference in quantization steps

    def line(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        if self.message:
            return f"{status}  {self.name}: {self.message}"
        if self.steps is not None:
            return (f"{status}  {self.name} [{','.join(map(str, self.shape))}] {self.dtype}: "
                    f"max {self.steps:.3g} quantization step{'s' if self.steps != 1 else ''} "
                    f"(at most 1 allowed), max abs {self.max_abs:.3g}, {self.mismatches} element"
                    f"{'s' if self.mismatches != 1 else ''} over")
        return (f"{status}  {self.name} [{','.join(map(str, self.shape))}] {self.dtype}: "
                f"max abs {self.max_abs:.3g}, mean abs {self.mean_abs:.3g}, p99 abs {self.p99_abs:.3g}, "
                f"max rel {self.max_rel:.3g} (atol {self.atol:.3g}, rtol {self.rtol:.3g}; "
                f"passes from atol {self.min_atol:.3g} at this rtol)")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CheckReport:
    """Truthy when every output of every run passed."""
    ok: bool
    provider: str
    runs: int
    input_shapes: dict
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    mode: str = "keep"

    def lines(self) -> list[str]:
        head = (f"check{' dense' if self.mode == 'dense' else ''} ({self.provider}, {self.runs} run{'s' if self.runs != 1 else ''}, inputs "
                + ", ".join(f"{k} [{','.join(map(str, v))}]" for k, v in self.input_shapes.items()) + "): "
                + ("PASSED" if self.ok else "FAILED"))
        return [head] + ["  " + o.line() for o in self.outputs] + ["  " + e for e in self.errors]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "mode": self.mode, "provider": self.provider, "runs": self.runs, "input_shapes": self.input_shapes,
                "outputs": [o.to_dict() for o in self.outputs], "errors": list(self.errors)}


def session(model_or_path, provider: str = "cpu", what: str = "the model"):
    """An onnxruntime session on exactly the provider asked for."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise Fc2ConvError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    want = PROVIDERS[provider]
    if want not in ort.get_available_providers():
        raise Fc2ConvError(f"provider {provider!r} is not available in this onnxruntime "
                           f"(it has {', '.join(ort.get_available_providers())}); "
                           + ("install onnxruntime-gpu instead of onnxruntime" if provider == "cuda" else ""))
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        try:  # onnxruntime-gpu finds CUDA/cuDNN from the nvidia pip packages this way
            ort.preload_dlls()
        except Exception:  # a missing library shows up below as a provider that cannot be created
            pass
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # errors come back as exceptions; the C++ logger must not print them
    tmpdir = None
    if isinstance(model_or_path, onnx.ModelProto):
        from .extdata import estimated_size, has_external, materialized
        from .save import PROTO_LIMIT, save

        if estimated_size(model_or_path) > PROTO_LIMIT:
            import tempfile  # onnxruntime reads a model over 2 GB from files only

            tmpdir = tempfile.TemporaryDirectory(prefix="onnx-fc2conv-")
            src = str(save(model_or_path, Path(tmpdir.name) / "model.onnx", external_data=True)[0])
        else:
            src = (materialized(model_or_path) if has_external(model_or_path) else model_or_path).SerializeToString()
    elif isinstance(model_or_path, bytes):  # a serialized model (probe.py)
        src = model_or_path
    else:
        src = str(model_or_path)
    # TF32 would round Conv and Gemm inputs to 10-bit mantissas on recent
    # GPUs: the check compares exact float32 arithmetic, so it is off.
    providers = [want] if provider == "cpu" else [(want, {"use_tf32": "0"}), "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime's own words are the reason
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise Fc2ConvError(f"onnxruntime cannot load {what}: {first}") from None
    if tmpdir is not None:
        tmpdir.cleanup()  # the session holds what it read
    if sess.get_providers()[0] != want:
        raise Fc2ConvError(f"onnxruntime could not create the {provider!r} provider and fell back to "
                           f"{sess.get_providers()[0]}; refusing to check on another provider")
    return sess


def _np_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def concrete_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]], batch: int = 2) -> dict[str, list[int]]:
    """A concrete shape for every graph input: overrides, else the declared
    dims with a free batch dim set to ``batch``."""
    from .shapes import input_infos

    shapes = {}
    for name, info in input_infos(model).items():
        if name in overrides:
            shapes[name] = [batch if isinstance(d, str) else d for d in overrides[name]]
            continue
        if info.shape is None:
            raise Fc2ConvError(f"input {name!r} has no declared shape; give it with --input-shape {name}=D0,D1,...")
        dims = []
        for axis, d in enumerate(info.shape):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(batch)
            else:
                shown = ",".join(str(x) if isinstance(x, int) else f"<{x or '?'}>" for x in info.shape)
                raise Fc2ConvError(f"input {name!r} has a symbolic dim {d or '?'!r} at axis {axis}; "
                                   f"give its size with --input-shape {name}={shown}")
        shapes[name] = dims
    return shapes


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    from .shapes import input_infos

    rng = np.random.default_rng(seed)
    feeds = {}
    for name, info in input_infos(model).items():
        dt = np.dtype(_np_dtype(info.elem_type))
        shape = shapes[name]
        if dt.kind == "f" or dt.name == "bfloat16":
            feeds[name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feeds[name] = rng.integers(0, 4, size=shape).astype(dt)
        elif dt.kind == "b":
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise Fc2ConvError(f"input {name!r} has dtype {dt}, which the check cannot generate; pass --inputs FILE.npz")
    return feeds


def load_inputs(model: onnx.ModelProto, path) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, validated against the model's inputs."""
    from .shapes import input_infos

    try:
        with np.load(path, allow_pickle=False) as npz:
            feeds = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise Fc2ConvError(f"{path}: no such file") from None
    except Exception as exc:  # numpy raises several types for a bad file
        raise Fc2ConvError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    infos = input_infos(model)
    missing = [n for n in infos if n not in feeds]
    extra = [n for n in feeds if n not in infos]
    if missing or extra:
        raise Fc2ConvError(f"{path}: inputs do not match the model: "
                           + (f"missing {', '.join(missing)}" if missing else "")
                           + ("; " if missing and extra else "")
                           + (f"unknown {', '.join(extra)}" if extra else "")
                           + f" (the model's inputs are: {', '.join(infos)})")
    for name, info in infos.items():
        arr = feeds[name]
        want = np.dtype(_np_dtype(info.elem_type))
        if arr.dtype != want:
            raise Fc2ConvError(f"{path}: input {name!r} has dtype {arr.dtype}, the model wants {want}")
        if info.shape is not None and (len(info.shape) != arr.ndim or any(
                isinstance(d, int) and d != s for d, s in zip(info.shape, arr.shape))):
            raise Fc2ConvError(f"{path}: input {name!r} has shape {list(arr.shape)}, the model wants "
                               f"[{','.join(str(d) if isinstance(d, int) else '?' for d in info.shape)}]")
    return feeds


def quant_steps(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The quantization step of each float graph output that a
    DequantizeLinear with a constant scale writes: the scale, shaped to
    broadcast against the output (per axis: along its axis). A per-tensor
    DequantizeLinear counts through ops that only reshape (keep mode's
    Flatten after a head whose chain ends with it)."""
    from .graph import GraphIndex, attr

    idx = GraphIndex(model)
    ranks = {o.name: len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None
             for o in model.graph.output}
    steps = {}
    for name, rank in ranks.items():
        node, reshaped = idx.producer.get(name), False
        while node is not None and node.op_type in ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"):
            node, reshaped = idx.producer.get(node.input[0]), True
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        scale = idx.value(node.input[1])
        if scale is None or int(attr(node, "block_size", 0) or 0) or (reshaped and scale.size > 1):
            continue
        scale = np.abs(scale.astype(np.float64))
        if scale.ndim == 1 and scale.size > 1:
            if rank is None:
                continue
            axis = int(attr(node, "axis", 1)) % rank
            scale = scale.reshape([-1 if i == axis else 1 for i in range(rank)])
        steps[name] = scale.reshape(()) if scale.size == 1 else scale
    return steps


def compare(name: str, expected: np.ndarray, actual: np.ndarray, elem_type: int,
            atol: float | None, rtol: float | None, step: np.ndarray | None = None) -> OutputReport:
    """One output: floats within atol/rtol, other integers exactly, and a
    quantized output (an integer of a quantized type, or ``step`` given: a
    requantized float output) within one quantization step."""
    dt = str(expected.dtype)
    if expected.shape != actual.shape:
        return OutputReport(name, list(expected.shape), dt, False, atol or 0.0, rtol or 0.0,
                            message=f"shape {list(actual.shape)} differs from the original's {list(expected.shape)}")
    if expected.dtype != actual.dtype:
        return OutputReport(name, list(expected.shape), dt, False, atol or 0.0, rtol or 0.0,
                            message=f"dtype {actual.dtype} differs from the original's {expected.dtype}")
    floating = elem_type in DEFAULT_TOLERANCES
    if elem_type in QUANTIZED_TYPES or (floating and step is not None):
        return _compare_steps(name, expected, actual, elem_type, atol, rtol, step)
    if not floating:
        diff = expected != actual
        n = int(np.count_nonzero(diff))
        rep = OutputReport(name, list(expected.shape), dt, n == 0, 0.0, 0.0, mismatches=n)
        if n:
            i = np.unravel_index(int(np.argmax(diff)), diff.shape)
            rep.worst_index = [int(x) for x in i]
            rep.message = f"{n} of {diff.size} elements differ (exact comparison), first at {rep.worst_index}"
        return rep
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    a0, r0 = DEFAULT_TOLERANCES[elem_type]
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    if not np.isfinite(scale):
        scale = 1.0
    atol_v = a0 * max(1.0, scale) if atol is None else float(atol)
    rtol_v = r0 if rtol is None else float(rtol)
    rep = OutputReport(name, list(expected.shape), dt, True, atol_v, rtol_v)
    if e.size == 0:
        return rep
    same = (np.isnan(e) & np.isnan(a)) | (a == e)  # equal infinities and NaNs in the same place agree
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(same, 0.0, np.abs(a - e))
    d = np.where(np.isnan(d), np.inf, d)
    rel = d / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
    rel = np.where(d == 0, 0.0, rel)
    worst = int(np.argmax(d))
    rep.max_abs = float(d.max())
    rep.mean_abs = float(d.mean())
    rep.p99_abs = float(np.quantile(d, 0.99)) if np.all(np.isfinite(d)) else float("inf")
    rep.max_rel = float(rel.max())
    rep.worst_index = [int(x) for x in np.unravel_index(worst, d.shape)]
    rep.worst_expected = float(e.reshape(-1)[worst])
    rep.worst_actual = float(a.reshape(-1)[worst])
    rep.min_atol = float(max(0.0, np.max(d - rtol_v * np.abs(e))))
    excess = np.where(d > atol_v, (d - atol_v) / np.maximum(np.abs(e), np.finfo(np.float64).tiny), 0.0)
    rep.min_rtol = float(excess.max())
    bad = d > atol_v + rtol_v * np.abs(e)
    rep.mismatches = int(np.count_nonzero(bad))
    rep.passed = rep.mismatches == 0
    return rep


def _compare_steps(name, expected, actual, elem_type, atol, rtol, step) -> OutputReport:
    """A quantized output: at most one step apart (a float output also
    passes within the float tolerances, for a step smaller than them)."""
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    floating = elem_type in DEFAULT_TOLERANCES
    if floating:
        a0, r0 = DEFAULT_TOLERANCES[elem_type]
        scale = float(np.max(np.abs(e))) if e.size and np.all(np.isfinite(e)) else 1.0
        atol_v = a0 * max(1.0, scale) if atol is None else float(atol)
        rtol_v = r0 if rtol is None else float(rtol)
        step = np.broadcast_to(np.where(step > 0, step, np.inf), e.shape) if e.size else step
    else:
        atol_v, rtol_v, step = 0.0, 0.0, np.ones(e.shape)
    rep = OutputReport(name, list(expected.shape), str(expected.dtype), True, atol_v, rtol_v, steps=0.0)
    if e.size == 0:
        return rep
    same = (np.isnan(e) & np.isnan(a)) | (a == e)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(same, 0.0, np.abs(a - e))
    d = np.where(np.isnan(d), np.inf, d)
    in_steps = d / step
    bad = (in_steps > STEP_TOLERANCE) & (d > atol_v + rtol_v * np.abs(e))
    worst = int(np.argmax(in_steps))
    rep.steps = float(np.round(in_steps.max(), 3))
    rep.max_abs = float(d.max())
    rep.mean_abs = float(d.mean())
    rep.p99_abs = float(np.quantile(d, 0.99)) if np.all(np.isfinite(d)) else float("inf")
    rel = np.where(d == 0, 0.0, d / np.maximum(np.abs(e), np.finfo(np.float64).tiny))
    rep.max_rel = float(rel.max())
    rep.worst_index = [int(x) for x in np.unravel_index(worst, d.shape)]
    rep.worst_expected = float(e.reshape(-1)[worst])
    rep.worst_actual = float(a.reshape(-1)[worst])
    rep.min_atol = float(max(0.0, np.max(d - rtol_v * np.abs(e))))
    rep.mismatches = int(np.count_nonzero(bad))
    rep.passed = rep.mismatches == 0
    return rep


def _merge(reports: list[OutputReport]) -> OutputReport:
    """Combine one output's reports over several runs (worst case wins)."""
    worst = max(reports, key=lambda r: (not r.passed, r.max_abs))
    out = OutputReport(**worst.__dict__)
    out.passed = all(r.passed for r in reports)
    out.mean_abs = float(np.mean([r.mean_abs for r in reports]))
    for key in ("max_rel", "min_atol", "min_rtol", "p99_abs"):
        setattr(out, key, max(getattr(r, key) for r in reports))
    out.atol = max(r.atol for r in reports)
    out.mismatches = sum(r.mismatches for r in reports)
    steps = [r.steps for r in reports if r.steps is not None]
    out.steps = max(steps) if steps else None
    return out


def check_models(original, converted, *, provider: str = "cpu", inputs=None, atol=None, rtol=None,
                 input_shapes: dict | None = None, runs: int = 3, seed: int = 0,
                 original_proto: onnx.ModelProto | None = None,
                 converted_proto: onnx.ModelProto | None = None) -> CheckReport:
    """Run both models and compare every output (keep mode).

    ``original``/``converted`` are paths or ModelProtos; the ``*_proto``
    arguments give their graphs when they are paths that were already loaded.
    """
    orig_proto = original_proto if original_proto is not None else original
    conv_proto = converted_proto if converted_proto is not None else converted
    errors = []
    for which, a, b in (("inputs", orig_proto.graph.input, conv_proto.graph.input),
                        ("outputs", orig_proto.graph.output, conv_proto.graph.output)):
        sig_a = [(v.name, v.type.SerializeToString()) for v in a]
        sig_b = [(v.name, v.type.SerializeToString()) for v in b]
        if which == "inputs":
            inits_a = {t.name for t in orig_proto.graph.initializer}
            inits_b = {t.name for t in conv_proto.graph.initializer}
            sig_a = [s for s in sig_a if s[0] not in inits_a]
            sig_b = [s for s in sig_b if s[0] not in inits_b]
        if sig_a != sig_b:
            errors.append(f"the converted model's {which} differ from the original's in name, dtype or shape")
    s_orig = session(original, provider, "the original model")
    out_types = {o.name: o.type.tensor_type.elem_type for o in orig_proto.graph.output}
    # requantized outputs: the step of their DequantizeLinear (keep mode leaves the nodes after a head as they
    # are, so the converted graph holds them where the original is known only by its inputs and outputs)
    graph_of = orig_proto if len(orig_proto.graph.node) else conv_proto
    steps = quant_steps(graph_of) if isinstance(graph_of, onnx.ModelProto) else {}
    if isinstance(inputs, dict):
        feed_sets = [inputs]
    elif inputs is not None:
        feed_sets = [load_inputs(orig_proto, inputs)]
    else:
        shapes = concrete_shapes(orig_proto, input_shapes or {})
        feed_sets = [random_inputs(orig_proto, shapes, seed + i) for i in range(runs)]
    # The original runs first: a model that cannot run is bad input (exit 2),
    # whatever the converted one does.
    expected_sets = []
    for feeds in feed_sets:
        try:
            expected_sets.append(s_orig.run(None, feeds))
        except Exception as exc:  # ORT's message is the reason the original cannot run
            raise Fc2ConvError(f"onnxruntime cannot run the original model on inputs "
                               f"{ {k: list(v.shape) for k, v in feeds.items()} }: {str(exc).splitlines()[0]}; "
                               "fix the input shape with --input-shape or --inputs") from None
    try:
        s_conv = session(converted, provider, "the converted model")
    except Fc2ConvError as exc:  # the converted model must load: if not, the check fails
        return CheckReport(False, provider, 0, {}, [], errors + [str(exc)])
    per_output: dict[str, list[OutputReport]] = {}
    for feeds, expected in zip(feed_sets, expected_sets):
        try:
            actual = s_conv.run(None, feeds)
        except Exception as exc:
            errors.append(f"onnxruntime cannot run the converted model: {str(exc).splitlines()[0]}")
            break
        names = [o.name for o in s_orig.get_outputs()]
        conv_names = [o.name for o in s_conv.get_outputs()]
        conv_by_name = dict(zip(conv_names, actual))
        for name, e in zip(names, expected):
            if name not in conv_by_name:
                errors.append(f"output {name!r} is missing from the converted model")
                continue
            per_output.setdefault(name, []).append(
                compare(name, np.asarray(e), np.asarray(conv_by_name[name]), out_types.get(name, 0), atol, rtol,
                        steps.get(name)))
    outputs = [_merge(v) for v in per_output.values()]
    shapes_used = {k: list(v.shape) for k, v in feed_sets[0].items()}
    ok = not errors and bool(outputs) and all(o.passed for o in outputs)
    return CheckReport(ok, provider, len(feed_sets), shapes_used, outputs, errors)
