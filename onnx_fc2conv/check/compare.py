"""One comparison, and the reports it fills.

Every output is compared elementwise with atol and rtol together:
``|conv - orig| <= atol + rtol * |orig|``. A Conv with a 7x7 kernel and a Gemm
sum in different orders, so the error is never exactly zero; the report gives
max/mean/p99 absolute and relative error, the worst element and the smallest
tolerance that would have passed (as Polygraphy does).

Default tolerances follow the output dtype. The default atol scales with the
output's magnitude (``atol = a0 * max(1, max|orig|)``) because a sum's
rounding error grows with the size of its terms, not of its result.

Quantized outputs are compared in quantization steps: a value that sums in
another order may land on the other side of a rounding boundary of a
requantization (QuantizeLinear, QLinearConv), so an integer output of a
quantized type (int8/uint8/int16/uint16) may differ by one step (1), and a
requantized float output, the DequantizeLinear of a constant scale, by one
step of that scale (:func:`quant_steps` finds it). The report gives the
measured maximum in steps. Other integer outputs are compared exactly, other
float outputs (a float result computed from dequantized values) with the
float tolerances. The keep and the dense check use the same rule.

A check compares one output several times (runs, window batches, input
sizes): :class:`Comparisons` collects them by label and merges each label's
reports once, the worst case winning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

DEFAULT_TOLERANCES = {
    onnx.TensorProto.FLOAT: (1e-5, 1e-4),
    onnx.TensorProto.DOUBLE: (1e-12, 1e-10),
    onnx.TensorProto.FLOAT16: (2e-3, 1e-2),
    onnx.TensorProto.BFLOAT16: (2e-2, 5e-2),
}
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
    """Truthy when every output of every run passed. ``notes``: what a check
    did not test, or tested with a figure that is not a verdict (neither
    passed nor failed)."""
    ok: bool
    provider: str
    runs: int
    input_shapes: dict
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    mode: str = "keep"
    notes: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def lines(self) -> list[str]:
        head = (f"check{' dense' if self.mode == 'dense' else ''} ({self.provider}, {self.runs} run"
                f"{'s' if self.runs != 1 else ''}, inputs "
                + ", ".join(f"{k} [{','.join(map(str, v))}]" for k, v in self.input_shapes.items()) + "): "
                + ("PASSED" if self.ok else "FAILED"))
        return ([head] + ["  " + o.line() for o in self.outputs] + ["  " + e for e in self.errors]
                + ["  " + n for n in self.notes])

    def to_dict(self) -> dict:
        return {"ok": self.ok, "mode": self.mode, "provider": self.provider, "runs": self.runs,
                "input_shapes": self.input_shapes, "outputs": [o.to_dict() for o in self.outputs],
                "errors": list(self.errors), "notes": list(self.notes)}

    def extend(self, other: "CheckReport") -> "CheckReport":
        """Both reports in one (the fine-map check after the dense one)."""
        self.outputs = list(self.outputs) + list(other.outputs)
        self.errors = list(self.errors) + list(other.errors)
        self.notes = list(self.notes) + list(other.notes)
        self.ok = bool(self.ok) and bool(other.ok)
        self.runs += other.runs
        return self


class Comparisons:
    """The comparisons of one check, by label; :meth:`report` merges them."""

    def __init__(self, atol=None, rtol=None):
        self.atol, self.rtol = atol, rtol
        self._by_label: dict[str, list[OutputReport]] = {}

    def add(self, label: str, expected, actual, elem_type: int, step=None) -> OutputReport:
        rep = compare(label, np.asarray(expected), np.asarray(actual), elem_type, self.atol, self.rtol, step)
        self._by_label.setdefault(label, []).append(rep)
        return rep

    def outputs(self) -> list[OutputReport]:
        return [merge(v) for v in self._by_label.values()]

    def report(self, provider: str, runs: int, input_shapes: dict, errors, mode: str = "keep",
               notes=()) -> CheckReport:
        outputs = self.outputs()
        ok = not errors and bool(outputs) and all(o.passed for o in outputs)
        return CheckReport(ok, provider, runs, input_shapes, outputs, list(errors), mode, list(notes))


def quant_steps(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The quantization step of each float graph output that a
    DequantizeLinear with a constant scale writes: the scale, shaped to
    broadcast against the output (per axis: along its axis). A per-tensor
    DequantizeLinear counts through ops that only reshape (keep mode's
    Flatten after a head whose chain ends with it)."""
    from ..graph import GraphIndex, attr

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
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    atol_v, rtol_v = _tolerances(e, elem_type, atol, rtol)
    rep = OutputReport(name, list(expected.shape), dt, True, atol_v, rtol_v)
    if e.size == 0:
        return rep
    d = _differences(e, a)
    _figures(rep, e, a, d, rtol_v)
    excess = np.where(d > atol_v, (d - atol_v) / np.maximum(np.abs(e), np.finfo(np.float64).tiny), 0.0)
    rep.min_rtol = float(excess.max())
    rep.mismatches = int(np.count_nonzero(d > atol_v + rtol_v * np.abs(e)))
    rep.passed = rep.mismatches == 0
    return rep


def _tolerances(e: np.ndarray, elem_type: int, atol, rtol) -> tuple[float, float]:
    a0, r0 = DEFAULT_TOLERANCES[elem_type]
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    if not np.isfinite(scale):
        scale = 1.0
    return (a0 * max(1.0, scale) if atol is None else float(atol)), (r0 if rtol is None else float(rtol))


def _differences(e: np.ndarray, a: np.ndarray) -> np.ndarray:
    """|a - e|, with equal infinities and NaNs in the same place agreeing."""
    same = (np.isnan(e) & np.isnan(a)) | (a == e)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(same, 0.0, np.abs(a - e))
    return np.where(np.isnan(d), np.inf, d)


def _figures(rep: OutputReport, e, a, d, rtol_v: float, worst: int | None = None) -> None:
    worst = int(np.argmax(d)) if worst is None else worst
    rel = np.where(d == 0, 0.0, d / np.maximum(np.abs(e), np.finfo(np.float64).tiny))
    rep.max_abs = float(d.max())
    rep.mean_abs = float(d.mean())
    rep.p99_abs = float(np.quantile(d, 0.99)) if np.all(np.isfinite(d)) else float("inf")
    rep.max_rel = float(rel.max())
    rep.worst_index = [int(x) for x in np.unravel_index(worst, d.shape)]
    rep.worst_expected = float(e.reshape(-1)[worst])
    rep.worst_actual = float(a.reshape(-1)[worst])
    rep.min_atol = float(max(0.0, np.max(d - rtol_v * np.abs(e))))


def _compare_steps(name, expected, actual, elem_type, atol, rtol, step) -> OutputReport:
    """A quantized output: at most one step apart (a float output also
    passes within the float tolerances, for a step smaller than them)."""
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    if elem_type in DEFAULT_TOLERANCES:
        atol_v, rtol_v = _tolerances(e if np.all(np.isfinite(e)) else np.ones(1), elem_type, atol, rtol)
        step = np.broadcast_to(np.where(step > 0, step, np.inf), e.shape) if e.size else step
    else:
        atol_v, rtol_v, step = 0.0, 0.0, np.ones(e.shape)
    rep = OutputReport(name, list(expected.shape), str(expected.dtype), True, atol_v, rtol_v, steps=0.0)
    if e.size == 0:
        return rep
    d = _differences(e, a)
    in_steps = d / step
    _figures(rep, e, a, d, rtol_v, worst=int(np.argmax(in_steps)))
    rep.max_abs = float(d.max())
    rep.steps = float(np.round(in_steps.max(), 3))
    rep.mismatches = int(np.count_nonzero((in_steps > STEP_TOLERANCE) & (d > atol_v + rtol_v * np.abs(e))))
    rep.passed = rep.mismatches == 0
    return rep


def merge(reports: list[OutputReport]) -> OutputReport:
    """One output's reports over several runs in one (the worst case wins)."""
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
