"""Dense mode: make a classifier fully convolutional.

For each head, with ``T`` the trunk's map the head reads (the input of a
global pool, else the collapsed map ``F``) and ``(h, w)`` its size at the
model's native input size::

    dense[:, :, i, j] == head(T[:, :, i:i+h, j:j+w])

A global pool (GlobalAveragePool/GlobalMaxPool, ReduceMean/ReduceMax over the
spatial axes, an AveragePool/MaxPool covering the map) becomes a pool with
kernel ``(h, w)`` and stride 1; the first FC a Conv with kernel ``(h, w)``
(``1x1`` after a pool); later FCs 1x1 Convs. What follows the FCs up to the
graph outputs must act per position: Softmax/LogSoftmax/Hardmax/ArgMax/ArgMin
act on the class axis (axis 1); below opset 13, where Softmax flattens
everything after its axis, it is wrapped in Transposes that make the class
axis last. The image input's spatial dims become symbolic.

This module decides (and refuses, naming the node); plan.py and rewrite.py
carry it out (:func:`signature`: the inputs, value_info and outputs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx

from . import ops
from .errors import Fc2ConvError
from .find import Head, Layer, item_nodes
from .rules import Context, Refusal
from .rules.collapse import covers, head_pool, pooled_source
from .rules.steps import Region, match_region, match_step
from .geometry import MapAxis, MapGeometry, pooled_segment, trace
from .graph import GraphIndex, node_key, node_label
from .plan import SignaturePlan
from .shapes import TensorInfo

log = logging.getLogger(__name__)

AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


@dataclass(frozen=True)
class DenseHead:
    head: Head
    source: str                      # T: the trunk map whose windows the head sees
    window: tuple                    # T's native spatial size
    pool: onnx.NodeProto | None      # node turned into a windowed pool, if any
    pool_op: str | None              # "AveragePool" or "MaxPool"
    tail: tuple                      # Steps from the head's end to the outputs (per position)
    outputs: tuple                   # graph outputs this head writes
    geometry: tuple                  # one Axis per spatial axis of the score map
    # pools before per-position ops that the collapse reads (pool -> 1x1
    # conv_head -> act; avg+max pools): (node, windowed pool op) each
    segment_pools: tuple = ()
    # identity views between those pools and the collapse, computed for the
    # native size (dynamo's as_strided): Gather nodes that become Identity
    segment_views: tuple = ()
    # a channels-last source pooled in place (an NHWC trunk's ReduceMean over
    # its spatial axes): the permutation that makes it [N, C, *S], else None
    source_perm: tuple | None = None
    # the windowed pool runs in float32 between Casts: onnxruntime's CPU has no
    # double AveragePool (open_nsfw casts its map to double around its mean)
    pool_in_float: bool = False

    @property
    def source_axes(self) -> tuple:
        """The spatial axes of ``source``, in the map's order."""
        return tuple(self.source_perm[2:]) if self.source_perm else tuple(range(2, 2 + len(self.window)))

    def map_geometry(self) -> MapGeometry:
        axes = tuple(MapAxis(a.input, a.input_axis, a.stride, a.receptive_field + (h - 1) * a.stride, a.offset, h)
                     for a, h in zip(self.geometry, self.window))
        return MapGeometry(tuple(self.outputs), axes, self.source, tuple(self.window),
                           any(a.padded for a in self.geometry))

    def geometry_dict(self) -> dict:
        return self.map_geometry().to_dict()


@dataclass
class DensePlan:
    heads: list[DenseHead]
    image_inputs: dict = field(default_factory=dict)   # input name -> spatial axes
    native: dict = field(default_factory=dict)         # input name -> native shape
    trunk_reshapes: list = field(default_factory=list)  # (Reshape node, spatial rank, middle dims)
    # their outputs' types: name -> (elem type, leading dims); below opset 14
    # inference cannot tell a Reshape's rank from a computed shape, so signature()
    # writes it down for every consumer downstream
    trunk_types: dict = field(default_factory=dict)
    kept_global: list = field(default_factory=list)     # trunk pools kept global (--keep-global-pools)
    refusals: list = field(default_factory=list)        # lenient analysis: what is not per position
    # a model without FC heads whose outputs are maps already (convolutional):
    # geometry.MapGeometry per group of outputs that share their geometry
    maps: list = field(default_factory=list)


def analyse(model: onnx.ModelProto, shapes: dict[str, TensorInfo], heads: list[Head], layers: list[Layer],
            overrides: dict, *, keep_global_pools: bool = False, lenient: bool = False,
            ctx: Context | None = None) -> DensePlan:
    """Decide the dense form of every head, or refuse naming the node.

    ``keep_global_pools``: global pools inside the trunk (squeeze-excitation)
    stay global over the whole input. ``lenient`` (the dense check of a model
    made dense by other means): trunk ops that are not per position are
    recorded in ``DensePlan.refusals`` instead of refused."""
    ctx = ctx or Context(GraphIndex(model), shapes)
    idx = ctx.idx
    pools = [_head_pool(ctx, head) for head in heads]
    found = trace(idx, shapes, [p[2] for p in pools], keep_global=keep_global_pools or lenient, lenient=lenient,
                  spatial={p[2]: set(p[5][2:]) for p in pools if p[5]})
    dynamic = _dynamic_quantization(heads)
    if dynamic and not lenient:
        raise Fc2ConvError(dynamic[0])
    # an FC the trunk applies per position (a Linear over a channels-last map)
    # is fine as it is; any other FC must have become a convolution
    per_position = {node_label(n) for n in idx.graph.node if n.output and n.output[0] in found.geo}
    for layer in layers:
        if not layer.converted and layer.name not in per_position:
            raise Fc2ConvError(f"FC {layer.name!r} is not converted ({layer.reason}); dense mode needs every FC "
                               "to become a convolution")
    out = DensePlan([], kept_global=found.kept_global, refusals=found.refusals + dynamic)
    for head, (pool, pool_op, source, segment, views, perm) in zip(heads, pools):
        spatial = tuple(perm[2:]) if perm else tuple(range(2, len(ctx.shape(source))))
        window = tuple(int(ctx.shape(source)[a]) for a in spatial)
        geo = found.geo.get(source, {})
        if perm and set(geo) != set(spatial):
            raise Fc2ConvError(f"the axes {sorted(spatial)} that {pool.op_type} {node_label(pool)!r} pools are not the "
                               f"spatial axes {sorted(geo)} of {source!r}; the model cannot be made dense")
        axes = []
        for axis in spatial:
            if axis not in geo:
                raise Fc2ConvError(f"cannot trace spatial axis {axis} of {source!r} back to an input; "
                                   "the model cannot be made dense")
            axes.append(geo[axis])
        tail, outputs = _tail(ctx, head)
        in_float = pool_op == "AveragePool" and ctx.shapes.get(source) is not None \
            and ctx.shapes[source].elem_type == onnx.TensorProto.DOUBLE
        if in_float:
            log.info("dense: the window mean of %r runs in float32 (onnxruntime has no double AveragePool)", source)
        dh = DenseHead(head, source, window, pool, pool_op, tuple(tail), tuple(outputs), tuple(axes), segment, views,
                       perm, in_float)
        out.heads.append(dh)
        for a in dh.geometry:
            out.image_inputs.setdefault(a.input, set()).add(a.input_axis)
    _trunk(out, found, shapes)
    for name, axes in out.image_inputs.items():
        info = shapes.get(name)
        native = overrides.get(name) or (list(info.shape) if info and info.shape else None)
        if native is None or not all(isinstance(native[a], int) for a in axes):
            raise Fc2ConvError(f"the native size of input {name!r} is not known; give it with --input-shape")
        out.native[name] = native
    return out


def _trunk(out: DensePlan, found, shapes) -> None:
    """The trunk Reshapes to rewrite, and their outputs' types to restate."""
    out.trunk_reshapes = found.reshapes
    for node, sp, _ in out.trunk_reshapes:
        info = shapes.get(node.output[0])
        if info is not None and info.shape is not None:
            out.trunk_types[node.output[0]] = (info.elem_type, list(info.shape[:len(info.shape) - sp]), sp)


def convolutional(ctx: Context, overrides: dict, *, keep_global_pools: bool = False) -> DensePlan | None:
    """A model without FC heads that is fully convolutional already but whose
    export fixes the spatial input size (MTCNN's P-Net at 12x12): every graph
    output is a map ``[N, C, *S]`` whose spatial axes trace back to input
    axes, through a trunk the allow-list accepts. The plan frees those input
    dims (and rewrites Reshapes that pin them); its ``maps`` are the geometry.

    None when the model is not one: an output without positions (a classifier
    whose global pool ends the map), input dims that are free already, or a
    trunk op that is not per position (logged with the reason)."""
    idx = ctx.idx
    outputs = [o.name for o in idx.graph.output]
    try:
        seen = trace(idx, ctx.shapes, outputs, keep_global=True, lenient=True)
    except Fc2ConvError as exc:  # paths that join at different strides: no map geometry
        log.info("dense: the outputs are not maps of the input: %s", exc)
        return None
    for o in outputs:
        rank = ctx.rank(o)
        if rank is None or rank < 3 or sorted(seen.geo.get(o) or {}) != list(range(2, rank)):
            return None
    inputs = {(a.input, a.input_axis) for o in outputs for a in seen.geo[o].values()}
    if all(not isinstance(_dim(ctx, overrides, name, axis), int) for name, axis in inputs):
        return None  # every spatial input dim is free already: nothing to change
    try:
        found = trace(idx, ctx.shapes, outputs, keep_global=keep_global_pools)
    except Fc2ConvError as exc:
        log.warning("dense: the model has no FC head and its outputs are maps, but its spatial input size stays "
                    "fixed: %s", exc)
        return None
    out = DensePlan([], kept_global=found.kept_global)
    groups: dict[tuple, list] = {}
    for o in outputs:
        geo = found.geo[o]
        axes = tuple(MapAxis(a.input, a.input_axis, a.stride, a.receptive_field, a.offset)
                     for a in (geo[k] for k in sorted(geo)))
        groups.setdefault(axes, []).append((o, any(a.padded for a in geo.values())))
    for axes, members in groups.items():
        out.maps.append(MapGeometry(tuple(o for o, _ in members), axes, padded=any(p for _, p in members)))
        for a in axes:
            out.image_inputs.setdefault(a.input, set()).add(a.input_axis)
    _trunk(out, found, ctx.shapes)
    for name in out.image_inputs:
        info = ctx.shapes.get(name)
        native = overrides.get(name) or (list(info.shape) if info and info.shape else None)
        if native is not None:
            out.native[name] = native
    return out


def _dim(ctx: Context, overrides: dict, name: str, axis: int):
    shape = overrides.get(name) or ctx.shape(name)
    return shape[axis] if shape is not None and axis < len(shape) else None


def _dynamic_quantization(heads: list[Head]) -> list[str]:
    """Why a head's dynamically quantized FC cannot be dense (one sentence
    each): its DynamicQuantizeLinear takes its scale over the whole tensor,
    so a position of the map would not see the scale the original computes
    on its window. Decided here once, for inspect and convert alike."""
    return [f"dense mode: FC {fc.name!r} quantizes its input with DynamicQuantizeLinear, whose scale is taken over "
            "the whole tensor, so a position of the dense map would not see the scale the original computes on its "
            "window; convert it in keep mode"
            for head in heads for fc in head.fcs if fc.quant is not None and fc.quant.format == "integer"]


def _head_pool(ctx: Context, head: Head):
    """(pool node or None, windowed pool op, T, segment pools, views, T's
    perm to channels-first or None): the map whose windows the head sees is
    the input of the head's global pool, else the collapsed map."""
    col = head.collapse
    f = col.source
    producer = ctx.idx.producer.get(f)
    kind = head_pool(ctx, producer, col)
    if kind is None:
        found = pooled_segment(ctx.idx, ctx.shapes, f) if all(d == 1 for d in col.feature_shape[1:]) else None
        if found is None:
            return None, None, f, (), (), None
        pools, _, views = found
        source = pools[0].input[0]
        tshape = ctx.shape(source)
        if tshape is None or not all(isinstance(d, int) for d in tshape[2:]):
            raise Fc2ConvError(f"the map {source!r} that the head pools has an unknown size; give --input-shape")
        return None, None, source, tuple((p, ops.WINDOWED_POOL[p.op_type]) for p in pools), tuple(views), None
    label = f"{producer.op_type} {node_label(producer)!r}"
    pool_op = ops.WINDOWED_POOL.get(producer.op_type)
    if pool_op is None:
        raise Fc2ConvError(f"{label} before FC {head.fcs[0].name!r} has no windowed pool equivalent; "
                           "the model cannot be made dense")
    source, perm = (pooled_source(ctx, producer) if producer.op_type in ops.REDUCES else None) \
        or (producer.input[0], None)
    tshape = ctx.shape(source)
    if tshape is None or not all(isinstance(d, int) for d in tshape[1:]):
        raise Fc2ConvError(f"the map {source!r} that {label} pools has an unknown size; give --input-shape")
    if kind == "covering" and not covers(producer, list(tshape[2:])):
        raise Fc2ConvError(f"{label} does not cover its whole map (every position counted once); "
                           "the model cannot be made dense")
    return producer, pool_op, source, (), (), perm


def _tail(ctx: Context, head: Head):
    """Steps from the head's end (and the end of each of its branches) to the
    graph outputs; each must act per position (rules/steps.py, with ops along
    the class axis). A head that forks has the tails of all its branches:
    each output is a map of the same geometry."""
    idx = ctx.idx
    tail, outputs, seen = [], [], set()
    branches = head.all_branches()
    # the branches' own nodes are converted with them, not carried as tail steps
    taken = {node_key(n) for b in branches for it in b.items for n in item_nodes(it)}
    for end, m in [(head.end, head.fcs[-1].m)] + [(b.end, b.fcs[-1].m) for b in branches]:
        frontier = [end]
        while frontier:
            t = frontier.pop(0)
            if t in seen:
                continue
            seen.add(t)
            if t in idx.outputs:
                outputs.append(t)
            if t in idx.sub_reads:
                raise Fc2ConvError(f"the head output {t!r} is read inside a subgraph; the model cannot be made dense")
            if sum(node_key(n) not in taken for n in idx.consumers.get(t, ())) > 1:
                # per-position ops that meet again (a region)
                region = match_region(t, m, head.spatial_rank, ctx, input_may_leave=True)
                if isinstance(region, Region):
                    taken.update(node_key(n) for n in region.nodes)
                    tail.append(region)
                    frontier.append(region.output)
            for node in idx.consumers.get(t, ()):
                if node_key(node) in taken:
                    continue
                step = match_step(node, t, m, head.spatial_rank, ctx, classes=True)
                if isinstance(step, Refusal):
                    raise Fc2ConvError(f"{node.op_type} {node_label(node)!r} after the head {step.reason}, "
                                       "so the model cannot be made dense")
                taken.add(node_key(node))
                tail.append(step)
                frontier.extend(o for o in node.output if o)
    if not outputs:
        raise Fc2ConvError(f"the head ending at {head.end!r} reaches no graph output")
    tail.sort(key=lambda st: idx.pos(st.node))
    return tail, outputs


def _symbolic_dims(plan: DensePlan) -> tuple:
    """``(input, axis, dim_param)`` for every spatial axis of the image inputs."""
    dims = []
    for inp, axes in plan.image_inputs.items():
        names = AXIS_NAMES.get(len(axes), tuple(f"s{i}" for i in range(len(axes))))
        for name, axis in zip(names, sorted(axes)):
            dims.append((inp, axis, name if len(plan.image_inputs) == 1 else f"{inp}_{name}"))
    return tuple(dims)


def window_sizes(plan: DensePlan, extra: int = 2) -> list[dict]:
    """Input sizes for the window check: native + ``extra`` strides on every
    spatial axis, and a non-square one (+1 and +3 strides)."""
    sizes = []
    for steps in ([extra] * 3, [1, 3, 2]):
        shape = {}
        for name, native in plan.native.items():
            dims = list(native)
            for j, axis in enumerate(sorted(plan.image_inputs[name])):
                stride = max(a.stride for h in plan.heads for a in h.geometry
                             if a.input == name and a.input_axis == axis)
                dims[axis] = native[axis] + steps[j % len(steps)] * stride
            shape[name] = dims
        if shape not in sizes:
            sizes.append(shape)
    return sizes


def signature(plan: DensePlan) -> SignaturePlan:
    """What the dense model changes besides nodes, for rewrite.apply:
    symbolic spatial input dims, no stale value_info (the trunk Reshapes'
    rank restated), the head outputs' shapes inferred afresh
    (``[N, classes, H', W']``)."""
    value_info = []
    for name, (elem, lead, sp) in plan.trunk_types.items():
        # the rank, and the leading dims; the spatial dims stay unnamed (a new
        # symbol would not unify with what tract derives from the input's)
        dims = [d if isinstance(d, int) else (d if isinstance(d, str) and not d.startswith("unk__") else None)
                for d in lead] + [None] * sp
        value_info.append((name, elem, tuple(dims)))
    spatial = len(plan.heads[0].window) if plan.heads else len(plan.maps[0].axes)
    names = AXIS_NAMES.get(spatial, tuple(f"s{i}" for i in range(spatial)))
    outputs = tuple(dict.fromkeys([o for h in plan.heads for o in h.outputs] + [o for g in plan.maps for o in g.outputs]))
    return SignaturePlan(_symbolic_dims(plan), tuple(value_info), outputs, names)
