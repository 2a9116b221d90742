"""Steps: the ops between and after FC layers that keep their meaning when
``[N, M]`` features become an ``[N, M, 1, ...]`` (keep) or ``[N, M, *S]``
(dense) map, and how each is re-emitted there.

Which ops qualify is read from the per-op table (ops.py):

- element-wise ops (``ops.POINTWISE``, ``ops.BROADCAST``) whose other inputs
  are constants that broadcast per feature; the constants are reshaped from
  ``[M]``/``[1, M]`` to ``[M, 1, ...]`` (kernels.per_feature). Clip's and
  Dropout's extra inputs may be non-constant scalars;
- per-channel ops (``ops.PER_CHANNEL``: BatchNormalization, inference mode);
- reshapes that are a no-op on ``[N, M]`` (Identity; a Flatten/Reshape/
  Squeeze whose output shape equals its input's): dropped in keep mode,
  Identity in dense mode;
- ops acting along the feature (class) axis alone (``ops.acted_axes``
  gives ``{1}`` on ``[N, M]``): LayerNormalization and LpNormalization
  anywhere in a head (``classes=True``); Softmax/LogSoftmax/Hardmax/ArgMax/
  ArgMin (``AFTER_HEAD``) only in the dense tail, as keep mode leaves them
  after the head. Re-emitted with ``axis=1``; where the op acts from its axis
  to the last (LayerNormalization; Softmax below opset 13), wrapped in
  Transposes that make the class axis last.

A **region** (:class:`Region`, :func:`match_region`) is a subgraph carried
over as one step: where the features fan out to several per-position ops
that meet again (GELU ``x * 0.5 * (1 + erf(x / sqrt 2))``, SiLU
``x * Sigmoid(x)``, Mish, Hardswish as ``x * HardSigmoid(x)``, a decomposed
LayerNorm or RMSNorm ``(x - mean(x)) / sqrt(var(x) + eps) * g + b``, and any
composition of them), no single op is a step, but the whole is. It is grown
from its one non-constant input over the nodes whose every non-constant
input is inside it and that act per position (the same table as single
steps, plus reductions along the feature axis only, keepdims=1), in graph
order; it is cut where exactly one tensor leaves it (the last such point, so
it takes every per-position op up to what follows). On the map it is the
same nodes again: constants reshaped per feature to ``[M, 1, ...]``,
reductions along axis 1 (the channel axis of ``[N, C, *S]``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import kernels, ops
from ..graph import attr, node_key, node_label
from ..ops import AFTER_HEAD, CLASS_AXIS, NOOP_RESHAPES, QUANTIZE, SCALAR_EXTRAS  # noqa: F401 (AFTER_HEAD: find.py)
from . import Context, Refusal
from .fc import match_fc


@dataclass(frozen=True)
class Step:
    """A per-position op carried over into the Conv layout."""
    node: onnx.NodeProto
    data_index: int              # which input is the chain tensor
    constants: tuple             # ((input index, value reshaped for [N, M, 1...]), ...)
    identity: bool = False       # a reshape that is a no-op on [N, M]: dropped
    class_axis: bool = False     # acts along the class axis: re-emitted with axis 1

    @property
    def nodes(self) -> tuple:
        return (self.node,)

    @property
    def input(self) -> str:
        """The tensor the step reads (the features, or the map)."""
        return self.node.input[self.data_index]


def match_step(node: onnx.NodeProto, t: str, m: int, spatial_rank: int, ctx: Context, *,
               classes: bool = False) -> Step | Refusal:
    """``node`` reads ``t`` (``[N, M]``): the Step it becomes, or why not.

    ``classes``: also accept ops along the class axis (the dense tail)."""
    idx = ctx.idx
    op = node.op_type
    what = "scores" if classes else "features"
    data = list(node.input).index(t)
    if classes and (node.domain, op) == (ops.MS_DOMAIN, "QLinearSoftmax") and data == 0 \
            and all(idx.value(i) is not None and idx.value(i).size == 1 for i in node.input[1:] if i):
        pass  # onnxruntime's quantized Softmax, per-tensor scales: along the class axis, checked below
    elif not ops.is_default(node):
        return Refusal(f"is a custom op ({node.domain}:{op})", node)
    if any(o and idx.uses(o) for o in node.output[1:]):
        return Refusal("has a second output that is used", node)
    if op in NOOP_RESHAPES:
        ishape, oshape = ctx.shape(t), ctx.shape(node.output[0])
        if data == 0 and (op == "Identity" or (ishape is not None and oshape is not None
                                              and list(ishape) == list(oshape) and len(ishape) == 2)):
            return Step(node, 0, (), identity=True)
        return Refusal(f"changes the shape {list(ishape or [])} -> {list(oshape or [])}", node)
    if op in ops.PER_CHANNEL:
        if data != 0 or int(attr(node, "training_mode", 0)):
            return Refusal("is in training mode" if data == 0 else f"reads the {what} as a parameter", node)
        return Step(node, 0, ())
    if op in ops.POINTWISE:
        if data != 0:
            return Refusal(f"reads the {what} as a parameter", node)
        return Step(node, 0, ())
    if op in ops.BROADCAST:
        consts = []
        for i, inp in enumerate(node.input):
            if i == data or not inp:
                continue
            v = idx.value(inp)
            if v is None:
                if op in SCALAR_EXTRAS and i > 0 and ctx.rank(inp) in (0, None):
                    continue
                return Refusal(f"combines the {what} with another tensor", node)
            try:
                reshaped = kernels.per_feature(v, m, spatial_rank)
            except kernels.NotPerFeature:
                return Refusal(f"uses a constant of shape {list(v.shape)} that is not per feature", node)
            if reshaped is not v:
                consts.append((i, reshaped))
        if op in SCALAR_EXTRAS and data != 0:
            return Refusal(f"reads the {what} as a parameter", node)
        if op in QUANTIZE and (consts or data != 0 or int(attr(node, "block_size", 0) or 0)):
            return Refusal("quantizes per axis or in blocks, not per tensor", node)
        return Step(node, data, tuple(consts))
    if classes and (op in CLASS_AXIS or op == "QLinearSoftmax") and data == 0:
        acted = ops.acted_axes(node, 2, idx.opset, idx.value)
        if acted != {1}:
            axes = sorted(acted) if acted is not None else "unknown axes"
            return Refusal(f"acts along axis {axes[0] if isinstance(axes, list) and len(axes) == 1 else axes}, "
                           "not the class axis", node)
        return Step(node, 0, (), class_axis=True)
    return Refusal("is not a per-position op", node)


def emit(step: Step, x: str, out: str, namer, spatial: int, opset: int, *, dense: bool,
         suffix: str = "_conv") -> tuple[list, list]:
    """The op of ``step`` on the map ``x`` (rank ``2 + spatial``), writing
    ``out``: (nodes, initializers)."""
    if isinstance(step, Region):
        return _emit_region(step, x, out, namer, opset, suffix)
    node = step.node
    if step.identity:
        return ([helper.make_node("Identity", [x], [out], name=node.name)] if dense else []), []
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.input[step.data_index] = x
    del new.output[1:]
    new.output[0] = out
    inits = []
    for index, value in step.constants:
        cname = namer(f"{node.input[index]}{suffix}")
        inits.append((cname, value))
        new.input[index] = cname
    if not step.class_axis:
        return [new], inits
    for a in list(new.attribute):
        if a.name == "axis":
            new.attribute.remove(a)
    if node.op_type == "QLinearSoftmax":
        opset = int(attr(node, "opset", opset))
    if ops.acts_to_last(node.op_type, opset):
        rank = 2 + spatial
        to_last = [0] + list(range(2, rank)) + [1]
        back = [0, rank - 1] + list(range(1, rank - 1))
        t1, t2 = namer(f"{out}_classlast"), namer(f"{out}_sm")
        new.input[0] = t1
        new.output[0] = t2
        new.attribute.append(helper.make_attribute("axis", rank - 1))
        return [helper.make_node("Transpose", [x], [t1], name=namer(f"{node.name}_to_last"), perm=to_last),
                new,
                helper.make_node("Transpose", [t2], [out], name=namer(f"{node.name}_back"), perm=back)], inits
    new.attribute.append(helper.make_attribute("axis", 1))
    return [new], inits


def describe(refusal: Refusal) -> str:
    """``Op 'name' <reason>``: a refusal as the start of a sentence."""
    n = refusal.node
    return f"{n.op_type} {node_label(n)!r} {refusal.reason}" if n is not None else refusal.reason


def label(step) -> str:
    """A step as ``inspect`` names it: the op, or ``region (Div, Erf, ...)``."""
    if isinstance(step, Region):
        return f"region ({step.ops})"
    return step.node.op_type


# -- regions ------------------------------------------------------------------

MAX_REGION = 64   # nodes: a bound on the walk, far above any activation or norm an exporter writes
REGION_OPS = ops.POINTWISE | ops.BROADCAST | ops.PER_CHANNEL | ops.REDUCES


@dataclass(frozen=True)
class Region:
    """A per-position subgraph carried over as one step (module docstring)."""
    nodes: tuple                 # in graph order; the last one writes ``output``
    input: str                   # its one non-constant input
    output: str                  # the one tensor that leaves it
    constants: tuple = ()        # ((node index, input index, value for the map), ...)
    reductions: tuple = ()       # indices of the reductions (along the features): re-emitted along axis 1
    reshaped: tuple = ()         # ((node index, input index, shape for the map), ...): dequantized constants

    @property
    def node(self) -> onnx.NodeProto:
        """The node that writes the output (plan.py names the map after it)."""
        return self.nodes[-1]

    @property
    def ops(self) -> str:
        return ", ".join(n.op_type for n in self.nodes)

    @property
    def per_feature(self) -> bool:
        """It reduces along the features or holds a per-feature parameter: on
        a flattened (not pooled) map it would mix positions."""
        return bool(self.reductions) or any(np.size(v) > 1 for _, _, v in self.constants) or bool(self.reshaped) \
            or any(n.op_type in ops.PER_CHANNEL for n in self.nodes)


def _region_node(node: onnx.NodeProto, inside: set, rank: int, ctx: Context) -> Refusal | None:
    """Why ``node`` (which reads a tensor of the region) cannot join it, or None."""
    idx = ctx.idx
    op = node.op_type
    if not ops.is_default(node):
        return Refusal(f"is a custom op ({node.domain}:{op})", node)
    if op not in REGION_OPS:
        return Refusal("is not a per-position op", node)
    if any(o and idx.uses(o) for o in node.output[1:]):
        return Refusal("has a second output that is used", node)
    if not idx.uses(node.output[0]):
        return Refusal("has an output that nothing reads", node)
    if op in QUANTIZE and match_fc(node, ctx) is not None:
        return Refusal("starts a quantized FC", node)   # a QDQ FC begins at its input's quantizer
    if any(name and name not in inside and not _constant(name, ctx) for name in node.input):
        return Refusal("combines the features with another tensor", node)
    if op in ops.BROADCAST:
        return None
    if any(name in inside for name in node.input[1:]):
        return Refusal("reads the features as a parameter", node)
    if op in ops.PER_CHANNEL and int(attr(node, "training_mode", 0)):
        return Refusal("is in training mode", node)
    if op in ops.REDUCES:
        if not int(attr(node, "keepdims", 1)):
            return Refusal("drops the axes it reduces (keepdims=0)", node)
        acted = ops.acted_axes(node, rank, idx.opset, idx.value)
        if acted is None:
            return Refusal("reduces along axes that are not known statically", node)
        shape = ctx.shape(node.input[0]) or ()
        # along the features (axis 1) only; other axes only where they have size 1 (a pooled map)
        wrong = sorted(a for a in acted if a == 0 or (a > 1 and (len(shape) <= a or shape[a] != 1)))
        if wrong or 1 not in acted:
            axis = wrong[0] if wrong else sorted(acted)[0] if acted else "none"
            return Refusal(f"acts along axis {axis}, not the feature axis", node)
    return None


def _constant(name: str, ctx: Context, depth: int = 3) -> bool:
    """A constant operand: a constant, or (QDQ models: onnxruntime's quantizer
    writes GELU's ``1.0`` as ``DequantizeLinear(QuantizeLinear(1.0))``, a
    LayerNorm's gamma as ``DequantizeLinear(int8 gamma)``) a tensor of static
    shape quantized and dequantized from constants: it stays as it is, and
    where it is per feature a Reshape on the map gives it ``[M, 1, ...]``."""
    idx = ctx.idx
    if idx.value(name) is not None:
        return True
    p = idx.producer.get(name)
    shape = ctx.shape(name)
    return depth > 0 and p is not None and p.op_type in QUANTIZE and ops.is_default(p) and shape is not None \
        and all(isinstance(d, int) for d in shape) and all(_constant(i, ctx, depth - 1) for i in p.input if i)


def grow_region(t: str, ctx: Context, *, end: str | None = None, input_may_leave: bool = False):
    """The nodes of the region read from ``t`` and its output: ``(nodes, output)``,
    a Refusal (the first node that stops it) or None when ``t`` is not a
    batch of feature vectors (``[N, M]``, or a pooled ``[N, C, 1, ...]``).

    ``end``: the region must end at this tensor (the collapse walks back from
    it). ``input_may_leave``: ``t`` may also be a graph output (the dense tail)."""
    idx = ctx.idx
    shape = ctx.shape(t)
    if shape is None or len(shape) < 2 or any(d != 1 for d in shape[2:]):
        return None
    if (t in idx.outputs and not input_may_leave) or t in idx.sub_reads:
        return None
    inside, members, cuts, refusal = {t}, [], [], None
    heap, queued = [], {}    # the consumers met so far, taken in graph order

    def push(name):
        for n in idx.consumers.get(name, ()):
            if node_key(n) not in queued:
                queued[node_key(n)] = n
                heapq.heappush(heap, (idx.pos(n), node_key(n)))

    push(t)
    while heap and len(members) < MAX_REGION:
        node = queued[heapq.heappop(heap)[1]]
        why = _region_node(node, inside, len(shape), ctx)
        if why is not None:
            refusal = refusal or why
            continue
        members.append(node)
        inside.add(node.output[0])
        push(node.output[0])
        out = _leaving(idx, t, inside, {node_key(n) for n in members})
        oshape = ctx.shape(out) if out is not None else None
        # the same features out as in (the batch dim's symbol may differ along the graph)
        if oshape is not None and (end is None or out == end) and len(oshape) == len(shape) \
                and list(oshape[1:]) == list(shape[1:]):
            cuts.append((len(members), out))
    if not cuts:
        return refusal or Refusal(f"the per-position ops that read {t!r} do not meet in one output")
    n, out = cuts[-1]
    return tuple(members[:n]), out


def _leaving(idx, t: str, inside: set, members: set) -> str | None:
    """The one tensor of the region read outside it, or None (none, several,
    or ``t`` itself read outside)."""
    def outside(x):
        return any(node_key(c) not in members for c in idx.consumers.get(x, ()))

    if outside(t):
        return None
    leaving = [x for x in inside if x != t and (outside(x) or x in idx.outputs or x in idx.sub_reads)]
    return leaving[0] if len(leaving) == 1 else None


def match_region(t: str, m: int, spatial_rank: int, ctx: Context, *, end: str | None = None,
                 input_may_leave: bool = False) -> Region | Refusal | None:
    """The region read from ``t`` (``[N, m]``, or a pooled ``[N, m, 1, ...]``
    of rank ``2 + spatial_rank``) as a step, a Refusal, or None (see grow_region)."""
    shape = ctx.shape(t)
    if shape is None or len(shape) not in (2, 2 + spatial_rank):
        return None
    grown = grow_region(t, ctx, end=end, input_may_leave=input_may_leave)
    if not isinstance(grown, tuple):
        return grown
    nodes, out = grown
    idx = ctx.idx
    inside = {t} | {n.output[0] for n in nodes}
    consts, reductions, reshaped = [], [], []
    for i, node in enumerate(nodes):
        if node.op_type in ops.REDUCES:
            reductions.append(i)
            continue
        if node.op_type not in ops.BROADCAST:
            continue  # a unary op, or per channel (its parameters index axis 1 on the map too)
        for j, name in enumerate(node.input):
            if not name or name in inside:
                continue
            v = idx.value(name)
            dequantized = v is None   # a dequantized constant (see _constant): its shape only
            if dequantized:
                v = np.zeros([int(d) for d in ctx.shape(name)], dtype=np.float32)
            try:
                mapped = _map_constant(v, len(shape), m, spatial_rank)
            except kernels.NotPerFeature:
                return Refusal(f"uses a constant of shape {list(v.shape)} that is not per feature", node)
            if node.op_type in QUANTIZE and v.size != 1:
                return Refusal("quantizes per axis or in blocks, not per tensor", node)
            if mapped is not v:
                if dequantized:
                    reshaped.append((i, j, tuple(mapped.shape)))
                else:
                    consts.append((i, j, mapped))
    return Region(nodes, t, out, tuple(consts), tuple(reductions), tuple(reshaped))


def _map_constant(v: np.ndarray, rank: int, m: int, spatial: int) -> np.ndarray:
    """A constant that broadcasts against a region tensor of rank ``rank``
    (``[N, M]``, or a pooled ``[N, M, 1, ...]``), reshaped to broadcast the
    same way against the map ``[N, M, *S]``."""
    if rank == 2:
        return kernels.per_feature(v, m, spatial)
    if v.size == 1 and v.ndim <= rank:
        return v
    s = (1,) * (rank - v.ndim) + tuple(v.shape)
    if v.ndim > rank or s[0] != 1 or any(d != 1 for d in s[2:]) or s[1] != m:
        raise kernels.NotPerFeature(f"constant of shape {list(v.shape)} is not per channel")
    return v.reshape((m,) + (1,) * spatial)


def _emit_region(region: Region, x: str, out: str, namer, opset: int, suffix: str) -> tuple[list, list]:
    """The region's nodes again on the map ``x``: fresh names inside, ``out``
    for its output, constants per feature, reductions along axis 1."""
    names = {region.input: x, region.output: out}
    consts = {(i, j): v for i, j, v in region.constants}
    reshaped = {(i, j): shape for i, j, shape in region.reshaped}
    nodes, inits = [], []
    for i, node in enumerate(region.nodes):
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for j, name in enumerate(node.input):
            if (i, j) in consts:
                cname = namer(f"{name}{suffix}")
                inits.append((cname, consts[(i, j)]))
                new.input[j] = cname
            elif (i, j) in reshaped:   # a dequantized per-feature constant: [M] -> [M, 1, ...]
                shape, cname = namer(f"{name}_map_shape"), namer(f"{name}{suffix}")
                inits.append((shape, np.array(reshaped[(i, j)], dtype=np.int64)))
                nodes.append(helper.make_node("Reshape", [name, shape], [cname], name=namer(f"{name}_to_map")))
                new.input[j] = cname
            elif name in names:
                new.input[j] = names[name]
        del new.output[1:]
        if node.output[0] not in names:
            names[node.output[0]] = namer(f"{node.output[0]}_map")
        new.output[0] = names[node.output[0]]
        if i in region.reductions:
            if attr(node, "axes", None) is not None:
                for a in list(new.attribute):
                    if a.name == "axes":
                        new.attribute.remove(a)
                new.attribute.append(helper.make_attribute("axes", [1]))
            else:  # axes as an input (ReduceSum-13, every reduction from opset 18)
                axes = namer(f"{node.output[0]}_axes{suffix}")
                inits.append((axes, np.array([1], dtype=np.int64)))
                new.input[1] = axes
        nodes.append(new)
    return nodes, inits
