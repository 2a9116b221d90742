"""The pipeline, top to bottom: load -> shapes -> find heads -> plan ->
rewrite -> check -> save. Each step is a module (or package) with one job."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import onnx

from . import atrous, dense as dense_mod, find, load as load_mod, plan as plan_mod, rewrite, shapes as shapes_mod
from .check import CheckReport, check_convolutional, check_dense, check_fine, check_models
from .errors import Fc2ConvError
from .find import Layer
from .geometry import MapGeometry
from .graph import GraphIndex
from .rules import Context

log = logging.getLogger(__name__)


@dataclass
class ConversionResult:
    """What :func:`convert` did. ``model`` is a new ModelProto."""
    model: onnx.ModelProto
    layers: list[Layer]
    heads: int
    dense: bool = False
    source: str | None = None
    input_shapes: dict = field(default_factory=dict)
    geometry: list = field(default_factory=list)   # dense mode: one entry per head
    original_io: onnx.ModelProto | None = None     # the original's inputs, outputs and initializer names
    probed: dict = field(default_factory=dict)     # shapes read from the onnxruntime probe (probe.py)

    @property
    def maps(self) -> list:
        """``geometry`` typed: one ``geometry.MapGeometry`` per head."""
        return [MapGeometry.from_dict(g) for g in self.geometry]

    @property
    def converted(self) -> int:
        return sum(1 for layer in self.layers if layer.converted)

    @property
    def changed(self) -> bool:
        """FCs converted, or (dense mode) a convolutional model's fixed spatial input size freed."""
        return self.converted > 0 or (self.dense and bool(self.geometry))

    def to_dict(self) -> dict:
        return {"source": self.source, "mode": "dense" if self.dense else "keep", "heads": self.heads,
                "fc_layers": len(self.layers), "converted": self.converted,
                "layers": [layer.to_dict() for layer in self.layers], "geometry": self.geometry,
                "probed_shapes": self.probed}


@dataclass
class InspectResult:
    layers: list[Layer]
    source: str | None = None
    geometry: list = field(default_factory=list)   # per head, if the model can be made dense
    dense_reason: str | None = None                # why it cannot, if not
    heads: list = field(default_factory=list)      # per head, its collapse, FCs and steps in order
    probed: dict = field(default_factory=dict)     # shapes read from the onnxruntime probe (probe.py)

    def to_dict(self) -> dict:
        return {"source": self.source, "fc_layers": len(self.layers), "probed_shapes": self.probed,
                "convertible": sum(1 for layer in self.layers if layer.converted),
                "layers": [layer.to_dict() for layer in self.layers], "heads": self.heads,
                "dense": {"possible": self.dense_reason is None and bool(self.geometry),
                          "reason": self.dense_reason, "geometry": self.geometry}}


def _overrides(input_shapes) -> dict[str, list[int]]:
    if not input_shapes:
        return {}
    if isinstance(input_shapes, dict):
        return {k: ["N" if (i == 0 and (isinstance(d, str) or int(d) < 0)) else int(d) for i, d in enumerate(v)]
                for k, v in input_shapes.items()}
    if isinstance(input_shapes, str):
        input_shapes = [input_shapes]
    return shapes_mod.parse_input_shapes(list(input_shapes))


def _io_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the keep-mode check needs of the original besides running it: its
    inputs, outputs and initializer names (no weights), so the CLI need not
    load a large original twice."""
    skeleton = onnx.ModelProto()
    skeleton.graph.input.extend(model.graph.input)
    skeleton.graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        skeleton.graph.initializer.add().name = t.name
    return skeleton


def _find(model: onnx.ModelProto, overrides: dict, all_fcs: bool = False, inputs=None):
    """Shapes and heads, and the one Context (graph index + shapes) the rest
    of the conversion reads; where the first FC's map has symbolic spatial
    dims and no --input-shape was given, the native size is derived from K.
    Shapes ONNX inference leaves unknown around the FCs are read from one
    onnxruntime run (probe.py): ``probed`` says which."""
    from . import probe

    shapes_mod.validate_overrides(model, overrides)
    idx = GraphIndex(model)
    ctx = Context(idx, shapes_mod.infer(model, overrides))
    probed = probe.fill(model, ctx.shapes, overrides, inputs, idx)
    try:
        heads, layers = find.find_heads(ctx, all_fcs=all_fcs)
    except find.NeedsInputShape as exc:
        derived = shapes_mod.derive_native(model, exc.tensor, exc.k, overrides)
        if derived is None:
            raise
        log.warning("native input size derived from FC %r (K=%d): %s", exc.fc_name, exc.k,
                    ", ".join(f"{n}={','.join(map(str, d))}" for n, d in derived.items() if n not in overrides))
        overrides = derived
        ctx = Context(idx, shapes_mod.infer(model, overrides))
        probed = probe.fill(model, ctx.shapes, overrides, inputs, idx)
        heads, layers = find.find_heads(ctx, all_fcs=all_fcs)
    return overrides, ctx, heads, layers, probed


def _corrupt_strings(fn):
    """protobuf decodes a string field only when it is read: a corrupt file
    may fail there, anywhere in the pipeline. That is bad input, not a bug."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UnicodeDecodeError:
            src = args[0] if args and isinstance(args[0], (str, os.PathLike)) else "the model"
            raise Fc2ConvError(f"{src}: a string in the model is not valid UTF-8; the file is corrupt") from None
    return wrapper


@_corrupt_strings
def convert(model, dense: bool = False, input_shapes=None, fold_batch: bool = False,
            keep_global_pools: bool = False, dense_stride: int | None = None,
            all_fcs: bool = False, inputs=None) -> ConversionResult:
    """Convert every convertible FC head of ``model`` into convolutions.

    Args:
        model: a path to an .onnx file, or an ``onnx.ModelProto`` (copied,
            never mutated).
        dense: make the model fully convolutional: each head output becomes a
            score map ``[N, classes, *spatial]`` (see dense.py).
        input_shapes: ``{"input": [1, 3, 224, 224]}`` or ``["input=1,3,224,224"]``,
            to fix symbolic input dims for shape inference.
        fold_batch: keep mode only: fold the batch into the first Conv's
            spatial axis so onnxruntime's CPU runs the head as one product
            per batch (faster at batch > 1; see plan.plan_heads).
        keep_global_pools: dense mode: global pools inside the trunk
            (squeeze-excitation blocks) stay global over the whole input
            instead of refusing; each position then sees the image-level
            channel context of the whole input (see dense.py).
        dense_stride: dense mode: a finer map of this stride (a divisor of
            the trunk's stride) by the à trous rewrite (see atrous.py).
        all_fcs: keep mode only: also FCs on plain vectors ``[N, K]``,
            MatMuls on token sequences ``[N, T, C]`` and Gemms with transA=1
            become 1x1 Convs between Reshapes/Transposes, for targets that
            accept only Conv (see rules/vecfc.py).
        inputs: an .npz path or a dict of arrays at the native size: what
            the runtime probe feeds (probe.py) instead of seeded random
            inputs, where ONNX inference leaves a needed shape unknown.

    Raises:
        Fc2ConvError: the model or an option is unusable (the message says why).
    """
    if all_fcs and dense:
        raise Fc2ConvError("--all-fcs is for keep mode: an FC on a plain vector has no map to make dense")
    overrides = _overrides(input_shapes)
    loaded = load_mod.load(model)
    # The test suite sets this: a model that strict consumers (onnx's full
    # check, strict inference: what tract and onnx2torch apply) accept must
    # stay acceptable after conversion; an AssertionError is a bug of ours.
    strict = bool(os.environ.get("ONNX_FC2CONV_STRICT")) and shapes_mod.strict_problem(loaded.model) is None
    original_io = _io_skeleton(loaded.model)
    overrides, ctx, heads, layers, probed = _find(loaded.model, overrides, all_fcs, inputs)
    map_fcs = find.find_map_fcs(ctx, layers)
    vec_fcs = find.find_vec_fcs(ctx, layers) if all_fcs else []
    if dense and not heads and any(not layer.converted for layer in layers):
        raise Fc2ConvError(_none_converted([layer for layer in layers if not layer.converted]))
    dense_plan = _dense_plan(loaded.model, ctx, heads, layers, overrides, keep_global_pools) if dense else None
    plans = plan_mod.plan_heads(loaded.model, heads, dense_plan, fold_batch=fold_batch, idx=ctx.idx,
                                map_fcs=map_fcs, vec_fcs=vec_fcs)
    rewrite.apply(loaded.model, plans, dense_mod.signature(dense_plan) if dense_plan is not None else None)
    maps = atrous.for_convert(loaded.model, dense, _maps(dense_plan), dense_stride)
    if strict:
        problem = shapes_mod.strict_problem(loaded.model)
        assert problem is None, f"the converted model fails onnx's full check or strict inference: {problem}"
    log.info("converted %d of %d FC layers in %d head(s)", sum(l.converted for l in layers), len(layers), len(heads))
    return ConversionResult(loaded.model, layers, len(heads), dense, str(loaded.path) if loaded.path else None,
                            overrides, [g.to_dict() for g in maps], original_io, _shown(probed))


def _dense_plan(model, ctx, heads, layers, overrides, keep_global_pools):
    """The dense analysis: of the heads, or, for a model without FC heads that
    is convolutional already, the plan that frees its fixed spatial input
    size (dense.convolutional); None when there is nothing to make dense."""
    if heads:
        return dense_mod.analyse(model, ctx.shapes, heads, layers, overrides, ctx=ctx,
                                 keep_global_pools=keep_global_pools)
    if all(layer.converted for layer in layers):
        return dense_mod.convolutional(ctx, overrides, keep_global_pools=keep_global_pools)
    return None


def _maps(dense_plan) -> list:
    """The dense geometry (geometry.MapGeometry per head or output group)."""
    if dense_plan is None:
        return []
    return [h.map_geometry() for h in dense_plan.heads] + list(dense_plan.maps)


def _shown(probed: dict) -> dict:
    """Probed shapes for reports: ``{tensor: [dims]}``, a symbolic dim as its name."""
    return {name: list(shape) for name, shape in probed.items()}


def _none_converted(layers) -> str:
    first = layers[0]
    return (f"none of the {len(layers)} FC layer{'s' if len(layers) != 1 else ''} converts (FC {first.name!r}: "
            f"{first.reason}); dense mode needs every FC to become a convolution")


@_corrupt_strings
def inspect(model, input_shapes=None, keep_global_pools: bool = False, all_fcs: bool = False,
            inputs=None) -> InspectResult:
    """List every FC layer: what it consumes and what it would become, or why
    not (``all_fcs``: as ``convert(all_fcs=True)`` would; the dense verdict
    is that of the default)."""
    overrides = _overrides(input_shapes)
    loaded = load_mod.load(model)
    overrides, ctx, heads, layers, probed = _find(loaded.model, overrides, inputs=inputs)
    find.find_map_fcs(ctx, layers)
    shown = layers
    if all_fcs:
        shown = find.find_heads(ctx, all_fcs=True)[1]   # the same shapes, probed ones included
        find.find_map_fcs(ctx, shown)
        find.find_vec_fcs(ctx, shown)
    geometry, reason = [], None
    if heads or all(layer.converted for layer in layers):
        try:
            geometry = [g.to_dict() for g in _maps(_dense_plan(loaded.model, ctx, heads, layers, overrides,
                                                               keep_global_pools))]
        except Fc2ConvError as exc:
            reason = str(exc)
    else:
        reason = _none_converted([layer for layer in layers if not layer.converted])
    return InspectResult(shown, str(loaded.path) if loaded.path else None, geometry, reason,
                         [_head_line(head) for head in heads], _shown(probed))


def _head_line(head) -> str:
    """``Flatten -> Gemm 'fc1' -> region (Div, Erf, Add, Mul, Mul) -> Gemm 'fc2'``:
    what a head carries to the map, in order (steps named by rules/steps.label)."""
    from .rules.steps import label

    parts = [head.collapse.pattern]
    for item in head.items:
        parts.append(f"{item.op} {item.name!r}" if isinstance(item, find.FC) else label(item))
    return " -> ".join(parts)


@_corrupt_strings
def check(original, converted, provider: str = "cpu", dense: bool = False, inputs=None, atol=None, rtol=None,
          input_shapes=None, runs: int = 3, seed: int = 0, dense_stride: int | None = None,
          keep_global_pools: bool = False) -> CheckReport:
    """Run ``original`` and ``converted`` (paths or ModelProtos) in onnxruntime
    and compare every output. The report is truthy when all outputs pass.
    ``dense_stride``: ``converted`` is a finer map of that stride (the plain
    dense model is made here, with ``keep_global_pools``, and proved too)."""
    overrides = _overrides(input_shapes)
    orig = load_mod.load(original, check=False)
    conv = load_mod.load(converted, check=False)
    if overrides:
        shapes_mod.validate_overrides(orig.model, overrides)
    return _dispatch(orig.path or orig.model, lambda: orig.model, conv.path or conv.model, conv.model,
                     dense=dense, provider=provider, inputs=inputs, atol=atol, rtol=rtol, input_shapes=overrides,
                     runs=runs, seed=seed, dense_stride=dense_stride, keep_global_pools=keep_global_pools)


def check_result(result: ConversionResult, provider: str = "cpu", inputs=None, atol=None, rtol=None,
                 dense_stride: int | None = None, keep_global_pools: bool = False) -> CheckReport:
    """Check what :func:`convert` returned against the model it read (the CLI's
    ``convert --check``): keep mode reads only the original's inputs and
    outputs from the result, so a large original is not loaded twice."""
    if result.dense and result.changed and not result.heads:  # a convolutional model whose size was freed
        if inputs is not None:
            raise Fc2ConvError("--inputs is not used by the dense check, which makes its own larger inputs; "
                               "leave it out")
        return check_convolutional(load_mod.load(result.source, check=False, weights_in_file=True).model, result.model,
                                             result.maps, provider=provider, atol=atol, rtol=rtol,
                                             input_shapes=result.input_shapes)
    original = result.source if result.source is not None else result.original_io
    return _dispatch(original, lambda: load_mod.load(result.source, check=False, weights_in_file=True).model, result.model, result.model,
                     dense=result.dense and result.changed, provider=provider, inputs=inputs, atol=atol, rtol=rtol,
                     input_shapes=result.input_shapes, original_io=result.original_io, dense_stride=dense_stride,
                     keep_global_pools=keep_global_pools)


def _dispatch(original, original_proto, converted, converted_proto, *, dense, provider, inputs, atol, rtol,
              input_shapes, runs: int = 3, seed: int = 0, original_io=None, dense_stride=None,
              keep_global_pools=False) -> CheckReport:
    """The one place that picks the check: keep-mode equality, the dense
    window check, or the fine-map check (``original_proto`` is called only
    where the whole original is needed)."""
    if dense:
        if inputs is not None:
            raise Fc2ConvError("--inputs is not used by the dense check, which makes its own larger inputs; "
                               "leave it out")
        if dense_stride:  # the plain dense map against the original, the fine one against the plain one
            orig = original_proto()
            plain = convert(orig, dense=True, input_shapes=input_shapes, keep_global_pools=keep_global_pools)
            native = {n: list(plain.input_shapes.get(n) or info.shape or [])
                      for n, info in shapes_mod.input_infos(orig).items()}
            return check_fine(orig, plain.model, plain.maps, plain.input_shapes, native, converted, dense_stride,
                              provider=provider, atol=atol, rtol=rtol)
        # a path is read by the check itself, which drops the graph once it is cut
        return check_dense(original if original is not None and not isinstance(original, onnx.ModelProto)
                           else original_proto(), converted, provider=provider, atol=atol, rtol=rtol,
                           input_shapes=input_shapes, seed=seed)
    return check_models(original, converted, provider=provider, inputs=inputs, atol=atol, rtol=rtol,
                        input_shapes=input_shapes, runs=runs, seed=seed,
                        original_proto=original_io if original_io is not None else original_proto(),
                        converted_proto=converted_proto)


def convert_graph(graph, dense: bool = False, input_shapes=None):
    """Graph-level entry for pipelines built on onnx-graphsurgeon:
    ``onnx_graphsurgeon.Graph`` in, a new converted Graph out."""
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph)
    result = convert(model, dense=dense, input_shapes=input_shapes)
    return gs.import_onnx(result.model)
