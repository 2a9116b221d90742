"""Static shapes of every tensor, from ONNX shape inference with data
propagation, run on a light copy of the graph (large initializers are replaced
by typed graph inputs, so inference never copies the weights).

``--input-shape NAME=D0,D1,...`` overrides are applied to that copy only: they
inform inference and the check, and never change the model's own inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
from onnx import helper

from .errors import Fc2ConvError

Dim = int | str | None  # a fixed size, a symbolic name, or unknown
_SMALL = 4096  # initializers with at most this many elements are kept for data propagation


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[Dim, ...] | None
    elem_type: int

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def static(self, start: int = 0) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape[start:])


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[Dim]]:
    """Parse ``NAME=D0,D1,...`` (or ``NAME:D0,...`` as onnxsim writes it).

    A batch (axis 0) given as ``-1``, ``?`` or ``N`` stays free, as exporters
    such as paddle2onnx write it; every other dim must be a positive size."""
    shapes: dict[str, list[Dim]] = {}
    for spec in specs or ():
        m = re.fullmatch(r"\s*(.+?)\s*[=:]\s*((?:-1|\?|N|\d+)(?:\s*[,x]\s*(?:-1|\?|N|\d+))*)\s*", spec)
        if not m:
            raise Fc2ConvError(f"--input-shape {spec!r} does not parse: write NAME=D0,D1,... e.g. input=1,3,224,224")
        dims: list[Dim] = []
        for i, d in enumerate(re.split(r"\s*[,x]\s*", m.group(2).strip())):
            if d in ("-1", "?", "N"):
                if i != 0:
                    raise Fc2ConvError(f"--input-shape {spec!r}: only the batch (the first dim) may be left free "
                                       f"with {d}; give every other dimension as a positive integer")
                dims.append("N")
                continue
            dims.append(int(d))
        if any(isinstance(d, int) and d <= 0 for d in dims):
            raise Fc2ConvError(f"--input-shape {spec!r}: every dimension must be a positive integer")
        shapes[m.group(1)] = dims
    return shapes


def _dims(type_proto: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out: list[Dim] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            out.append(int(d.dim_value))  # a negative size (paddle2onnx's free batch) is unknown
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def input_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    inits = {t.name for t in model.graph.initializer}
    return {i.name: TensorInfo(_dims(i.type), i.type.tensor_type.elem_type)
            for i in model.graph.input if i.name not in inits}


def derive_native(model: onnx.ModelProto, tensor: str, k: int, overrides: dict) -> dict | None:
    """The native input size, from the first FC's K, when it is unambiguous:
    the image input's symbolic spatial dims set to one size ``s`` (a square
    image) for which the map ``tensor`` has C*prod(spatial) == K. K(s) does
    not shrink as s grows, so a binary search over s finds it; the batch
    stays symbolic. None when no such size exists."""
    infos = input_infos(model)
    free = {name: [i for i, d in enumerate(info.shape or ()) if i > 0 and not isinstance(d, int)]
            for name, info in infos.items() if name not in overrides}
    free = {n: axes for n, axes in free.items() if axes}
    if len(free) != 1:
        return None
    name, axes = next(iter(free.items()))
    base = list(infos[name].shape)

    def k_at(size: int):
        dims = [size if i in axes else (d if isinstance(d, int) else (d or "N")) for i, d in enumerate(base)]
        try:
            shape = infer(model, {**overrides, name: dims}).get(tensor)
        except Fc2ConvError:
            return -1, dims
        if shape is None or shape.shape is None or not all(isinstance(d, int) for d in shape.shape[1:]):
            return -1, dims
        n = 1
        for d in shape.shape[1:]:
            n *= d
        return n, dims

    lo, hi = 1, 4096
    if k_at(hi)[0] < k:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if k_at(mid)[0] < k:
            lo = mid + 1
        else:
            hi = mid
    found, dims = k_at(lo)
    return {**overrides, name: dims} if found == k else None


def validate_overrides(model: onnx.ModelProto, overrides: dict[str, list[int]]) -> None:
    infos = input_infos(model)
    for name, dims in overrides.items():
        if name not in infos:
            raise Fc2ConvError(f"--input-shape names {name!r}, which is not an input of the model; "
                               f"its inputs are: {', '.join(infos) or '(none)'}")
        shape = infos[name].shape
        if shape is not None and len(shape) != len(dims):
            raise Fc2ConvError(f"--input-shape {name}={','.join(map(str, dims))} has rank {len(dims)}, "
                               f"but input {name!r} has rank {len(shape)} {_fmt(shape)}")
        for axis, (want, have) in enumerate(zip(dims, shape or ())):
            if isinstance(have, int) and not isinstance(want, int):
                raise Fc2ConvError(f"--input-shape {name}={','.join(map(str, dims))} leaves axis {axis} free, "
                                   f"but the model fixes it at {have} {_fmt(shape)}")
            if isinstance(have, int) and isinstance(want, int) and have != want:
                raise Fc2ConvError(f"--input-shape {name}={','.join(map(str, dims))} sets axis {axis} to {want}, "
                                   f"but the model fixes it at {have} {_fmt(shape)}")


def _fmt(shape) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def light_model(model: onnx.ModelProto, overrides: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of the graph without its large weights: initializers over
    ``_SMALL`` elements (or stored externally) become typed graph inputs, so
    shape inference and the checker never copy the weights."""
    overrides = overrides or {}
    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = graph.name
    lg.node.extend(graph.node)
    lg.output.extend(graph.output)
    lg.value_info.extend(graph.value_info)
    input_names = set()
    for inp in graph.input:
        vi = lg.input.add()
        vi.CopyFrom(inp)
        input_names.add(inp.name)
        if inp.name in overrides:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in overrides[inp.name]:
                if isinstance(d, str):
                    shape.dim.add().dim_param = d  # a derived size keeps a symbolic batch
                else:
                    shape.dim.add().dim_value = d
    for vi in list(lg.input) + list(lg.output) + list(lg.value_info):
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:  # paddle2onnx's free batch: unknown, not a size
                d.Clear()
                d.dim_param = f"{vi.name}_dim{axis}"
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n <= _SMALL and not (t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL):
            lg.initializer.append(t)
        elif t.name not in input_names:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def infer(model: onnx.ModelProto, overrides: dict[str, list[int]] | None = None) -> dict[str, TensorInfo]:
    """Shapes of all tensors (graph inputs, initializers, node outputs)."""
    overrides = overrides or {}
    light = light_model(model, overrides)
    del light.graph.value_info[:]  # stale annotations must not override what inference derives
    input_names = {i.name for i in model.graph.input}
    infos: dict[str, TensorInfo] = {t.name: TensorInfo(tuple(int(d) for d in t.dims), t.data_type)
                                    for t in model.graph.initializer}
    inferred = _run_inference(light)
    if not overrides and model.graph.value_info:
        # Where inference knows nothing (a custom op's output), the exporter's
        # annotation is all there is: use it, and infer again from there.
        known = {vi.name for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
                 if vi.type.tensor_type.HasField("shape")}
        missing = [vi for vi in model.graph.value_info
                   if vi.name not in known and vi.type.tensor_type.HasField("shape") and vi.name not in infos]
        if missing:
            light.graph.value_info.extend(missing)
            inferred = _run_inference(light)
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name in infos and vi.name not in input_names:
            continue
        if vi.type.HasField("tensor_type"):
            infos[vi.name] = TensorInfo(_dims(vi.type), vi.type.tensor_type.elem_type)
    return infos


def _run_inference(light: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several types here; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Fc2ConvError(f"shape inference failed: {first}") from None


def strict_problem(model: onnx.ModelProto) -> str | None:
    """What a strict consumer would reject in ``model``: the first message of
    ``onnx.checker.check_model(full_check=True)`` or of strict shape inference
    (run on a weight-free copy), or None. Every model the tool writes must
    give None (asserted on every conversion of the test suite, see api.convert)."""
    light = light_model(model)
    try:
        onnx.checker.check_model(light, full_check=True)
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises several types; the message is what matters
        return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return None
