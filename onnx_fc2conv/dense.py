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
carry it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import onnx
from onnx import helper

from . import ops
from .errors import Fc2ConvError
from .find import Head, Layer, item_nodes
from .rules import Context, Refusal
from .rules.collapse import WINDOWED_POOL, covers, head_pool, pooled_map
from .rules.steps import match_step
from .geometry import MapAxis, MapGeometry, pooled_segment, trace
from .graph import GraphIndex, node_key, node_label
from .shapes import TensorInfo

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
    # inference cannot tell a Reshape's rank from a computed shape, so finish()
    # writes it down for every consumer downstream
    trunk_types: dict = field(default_factory=dict)
    kept_global: list = field(default_factory=list)     # trunk pools kept global (--keep-global-pools)
    refusals: list = field(default_factory=list)        # lenient analysis: what is not per position


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
    found = trace(idx, shapes, [p[2] for p in pools], keep_global=keep_global_pools or lenient, lenient=lenient)
    # an FC the trunk applies per position (a Linear over a channels-last map)
    # is fine as it is; any other FC must have become a convolution
    per_position = {node_label(n) for n in idx.graph.node if n.output and n.output[0] in found.geo}
    for layer in layers:
        if not layer.converted and layer.name not in per_position:
            raise Fc2ConvError(f"FC {layer.name!r} is not converted ({layer.reason}); dense mode needs every FC "
                               "to become a convolution")
    out = DensePlan([], kept_global=found.kept_global, refusals=found.refusals)
    for head, (pool, pool_op, source, segment, views) in zip(heads, pools):
        window = tuple(int(d) for d in ctx.shape(source)[2:])
        geo = found.geo.get(source, {})
        axes = []
        for axis in range(2, 2 + len(window)):
            if axis not in geo:
                raise Fc2ConvError(f"cannot trace spatial axis {axis} of {source!r} back to an input; "
                                   "the model cannot be made dense")
            axes.append(geo[axis])
        tail, outputs = _tail(ctx, head)
        dh = DenseHead(head, source, window, pool, pool_op, tuple(tail), tuple(outputs), tuple(axes), segment, views)
        out.heads.append(dh)
        for a in dh.geometry:
            out.image_inputs.setdefault(a.input, set()).add(a.input_axis)
    out.trunk_reshapes = found.reshapes
    for node, sp, _ in out.trunk_reshapes:
        info = shapes.get(node.output[0])
        if info is not None and info.shape is not None:
            out.trunk_types[node.output[0]] = (info.elem_type, list(info.shape[:len(info.shape) - sp]), sp)
    for name, axes in out.image_inputs.items():
        info = shapes.get(name)
        native = overrides.get(name) or (list(info.shape) if info and info.shape else None)
        if native is None or not all(isinstance(native[a], int) for a in axes):
            raise Fc2ConvError(f"the native size of input {name!r} is not known; give it with --input-shape")
        out.native[name] = native
    return out


def _head_pool(ctx: Context, head: Head):
    """(pool node or None, windowed pool op, T): the map whose windows the
    head sees is the input of the head's global pool, else the collapsed map."""
    col = head.collapse
    f = col.source
    producer = ctx.idx.producer.get(f)
    kind = head_pool(ctx, producer, col)
    if kind is None:
        found = pooled_segment(ctx.idx, ctx.shapes, f) if all(d == 1 for d in col.feature_shape[1:]) else None
        if found is None:
            return None, None, f, (), ()
        pools, _, views = found
        source = pools[0].input[0]
        tshape = ctx.shape(source)
        if tshape is None or not all(isinstance(d, int) for d in tshape[2:]):
            raise Fc2ConvError(f"the map {source!r} that the head pools has an unknown size; give --input-shape")
        return None, None, source, tuple((p, WINDOWED_POOL[p.op_type]) for p in pools), tuple(views)
    label = f"{producer.op_type} {node_label(producer)!r}"
    pool_op = WINDOWED_POOL.get(producer.op_type)
    if pool_op is None:
        raise Fc2ConvError(f"{label} before FC {head.fcs[0].name!r} has no windowed pool equivalent; "
                           "the model cannot be made dense")
    source = (pooled_map(ctx, producer) if producer.op_type in ops.REDUCES else None) or producer.input[0]
    tshape = ctx.shape(source)
    if tshape is None or not all(isinstance(d, int) for d in tshape[2:]):
        raise Fc2ConvError(f"the map {source!r} that {label} pools has an unknown size; give --input-shape")
    if kind == "covering" and not covers(producer, list(tshape[2:])):
        raise Fc2ConvError(f"{label} does not cover its whole map (every position counted once); "
                           "the model cannot be made dense")
    return producer, pool_op, source, (), ()


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


def plan_trunk_reshape(idx: GraphIndex, namer, node: onnx.NodeProto, s: int, middle: list):
    """A Reshape that pins the spatial size (a channel shuffle) gets its
    shape from its input: ``Concat(Shape(x)[0], middle, Shape(x)[-s:])``.
    Returns (nodes, initializers)."""
    x = node.input[0]
    sh, b, sp, shape = (namer(f"{x}_shape"), namer(f"{x}_batch"), namer(f"{x}_spatial"), namer(f"{x}_dense_shape"))
    first, last, mid = namer(f"{x}_i0"), namer(f"{x}_ispatial"), namer(f"{x}_middle")
    inits = [(first, np.array([0], np.int64)), (last, np.arange(-s, 0, dtype=np.int64)),
             (mid, np.array(middle, np.int64))]
    reshape = onnx.NodeProto()
    reshape.CopyFrom(node)
    reshape.input[1] = shape
    nodes = [helper.make_node("Shape", [x], [sh], name=namer(f"{node.name}_shape")),
             helper.make_node("Gather", [sh, first], [b], name=namer(f"{node.name}_batch"), axis=0),
             helper.make_node("Gather", [sh, last], [sp], name=namer(f"{node.name}_spatial"), axis=0),
             helper.make_node("Concat", [b, mid, sp], [shape], name=namer(f"{node.name}_concat"), axis=0),
             reshape]
    return nodes, inits


def symbolic_inputs(model: onnx.ModelProto, plan: DensePlan) -> None:
    """Make the image inputs' spatial dims symbolic, in place."""
    for inp in model.graph.input:
        axes = plan.image_inputs.get(inp.name)
        if not axes:
            continue
        names = AXIS_NAMES.get(len(axes), tuple(f"s{i}" for i in range(len(axes))))
        dims = inp.type.tensor_type.shape.dim
        for name, axis in zip(names, sorted(axes)):
            dims[axis].Clear()
            dims[axis].dim_param = name if len(plan.image_inputs) == 1 else f"{inp.name}_{name}"


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


def finish(model: onnx.ModelProto, plan: DensePlan) -> None:
    """After the rewrite: symbolic spatial input dims, no stale value_info,
    and output types inferred afresh (``[N, classes, H', W']``)."""
    from . import shapes as shapes_mod

    symbolic_inputs(model, plan)
    del model.graph.value_info[:]
    for name, (elem, lead, sp) in plan.trunk_types.items():
        # the rank, and the leading dims; the spatial dims stay unnamed (a new
        # symbol would not unify with what tract derives from the input's)
        dims = [d if isinstance(d, int) else (d if isinstance(d, str) and not d.startswith("unk__") else None)
                for d in lead] + [None] * sp
        model.graph.value_info.append(helper.make_tensor_value_info(name, elem, dims))
    head_outputs = {o for h in plan.heads for o in h.outputs}
    spatial = len(plan.heads[0].window)
    names = AXIS_NAMES.get(spatial, tuple(f"s{i}" for i in range(spatial)))
    before = {}
    for o in model.graph.output:
        if o.name in head_outputs:
            before[o.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in o.type.tensor_type.shape.dim]
            o.type.tensor_type.ClearField("shape")
    infos = shapes_mod.infer(model)
    for o in model.graph.output:
        if o.name not in head_outputs:
            continue
        info = infos.get(o.name)
        # What inference found, else the original dims followed by the map's
        # (an output of a channel-shuffled trunk may defeat inference).
        dims = list(info.shape) if info is not None and info.shape is not None else \
            before[o.name] + [None] * spatial
        shape = o.type.tensor_type.shape
        for i, d in enumerate(dims):
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str) and d and not d.startswith("unk__"):
                dim.dim_param = d
            elif i >= len(dims) - spatial:
                dim.dim_param = f"{o.name}_{names[i - (len(dims) - spatial)]}"
