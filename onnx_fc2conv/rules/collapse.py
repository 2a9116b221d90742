"""Collapses: how the first FC of a head sees a spatial feature map.

``F [N, C, *S]`` -> optional ``Transpose(perm)`` -> any chain of Flatten /
Reshape / Squeeze / Unsqueeze / Identity / Dropout that ends in
``[N, C*prod(S)]``. Those ops keep row-major order, so the whole collapse is
``flatten(transpose(F, perm))``; whether it keeps the batch axis is decided by
evaluating the shapes it computes (a Reshape's shape may be a constant or an
expression of ``Shape(F)``) for concrete batch sizes, not by the node list.
A global reduction with ``keepdims=0`` (``[N, C]``) counts as a map with
all-ones spatial dims.

:func:`head_pool` is the one place that decides whether the op producing
``F`` pools the whole map (a global pool, a reduction over every spatial
axis, an AveragePool/MaxPool whose window covers the map) and which windowed
pool it becomes in dense mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .. import ops
from ..graph import attr, node_key, node_label, run_nodes
from ..ops import RESHAPE_LIKE, WINDOWED_POOL  # noqa: F401 (WINDOWED_POOL: dense.py)
from . import Context, Refusal
from .steps import REGION_OPS, Region, describe, grow_region, match_region, match_step


@dataclass(frozen=True)
class Collapse:
    source: str                  # F
    perm: tuple                  # transpose applied before flattening
    feature_shape: tuple         # (C, *S) in F's own axis order
    nodes: tuple
    pattern: str
    layout: str
    unsqueeze: int = 0           # F is [N, C] from a keepdims=0 reduction over this many axes
    steps: tuple = ()            # per-position Steps in the collapse, in order: applied to the map


class NeedsShape(Exception):
    """F's spatial size depends on symbolic input dims (find.py turns this
    into the user-facing NeedsInputShape)."""

    def __init__(self, tensor, shape):
        super().__init__(tensor)
        self.tensor, self.shape = tensor, shape


class _Unknown(Exception):
    pass


def fmt_shape(shape) -> list:
    return ["?" if d is None else d for d in (shape or ())]


def global_reduce_rank(ctx: Context, node: onnx.NodeProto, keepdims: int | None = None) -> int:
    """The spatial rank a reduction removes when it reduces every spatial axis
    of a ``[N, C, *S]`` map (with ``keepdims`` as given, or either); else 0.
    A reduction over ``[N, *S, C]`` that a ``Transpose`` made from such a map
    (Keras' GlobalAveragePooling2D through tf2onnx: ``ReduceMean(axes=[1,2])``)
    counts too: see :func:`pooled_map`."""
    if node.op_type not in ops.REDUCES or not ops.is_default(node):
        return 0
    rank = ctx.rank(node.input[0])
    if rank is None or rank < 3:
        return 0
    if keepdims is not None and int(attr(node, "keepdims", 1)) != keepdims:
        return 0
    if pooled_map(ctx, node) is None:
        return 0
    return rank - 2


def pooled_map(ctx: Context, node: onnx.NodeProto) -> str | None:
    """The map ``[N, C, *S]`` that a reduction pools whole: its input, or,
    for a reduction over the spatial axes of a channels-last
    ``Transpose(0, 2, ..., 1)`` of a map, that Transpose's input; None when
    it does not reduce every spatial axis. A channels-last map with no
    Transpose right before the reduction is its input too: see
    :func:`pooled_source` for its axis order."""
    found = pooled_source(ctx, node)
    return found[0] if found is not None else None


def pooled_source(ctx: Context, node: onnx.NodeProto) -> tuple | None:
    """``(map, perm)``: the map a reduction pools whole, and the permutation
    that makes it channels-first (None where it is). A reduction with
    keepdims=0 over exactly the axes that are spatial in the trunk's layout
    (:func:`spatial_axes`: an NHWC trunk, ``ReduceMean(axes=[1,2])`` with no
    Transpose right before it) pools its input whole; its perm puts the one
    other axis, the channels, at 1."""
    rank = ctx.rank(node.input[0]) or 0
    acted = ops.acted_axes(node, rank, ctx.idx.opset, ctx.idx.value)
    if acted is None or rank < 3:
        return None
    spatial = set(range(2, rank))
    if acted == spatial:
        return node.input[0], None
    if int(attr(node, "keepdims", 1)) != 0:
        return None
    producer = ctx.idx.producer.get(node.input[0])
    if producer is not None and producer.op_type == "Transpose" and ops.is_default(producer):
        perm = list(attr(producer, "perm", []) or [])
        if len(perm) == rank and perm[0] == 0 and {perm[a] for a in acted} == spatial:
            return producer.input[0], None
    if 0 not in acted and len(acted) == rank - 2 and spatial_axes(ctx, node.input[0]) == acted:
        channel = next(a for a in range(1, rank) if a not in acted)
        return node.input[0], (0, channel) + tuple(sorted(acted))
    return None


# ops through which a map keeps its axis order (the spatial axes stay where they are)
_KEEPS_LAYOUT = ops.POINTWISE | ops.BROADCAST | {"Pad", "Concat"}


def spatial_axes(ctx: Context, tensor: str, limit: int = 64) -> set | None:
    """The axes of ``tensor`` that are spatial, read back through element-wise
    ops and Transposes to the windowed op or pool that wrote a channels-first
    ``[N, C, *S]`` map; None when the walk meets anything else (geometry.py
    then checks the whole trunk in dense mode)."""
    idx = ctx.idx
    rank = ctx.rank(tensor)
    if rank is None:
        return None
    where = list(range(rank))     # axis i of ``tensor`` is axis where[i] of ``t``
    t = tensor
    for _ in range(limit):
        p = idx.producer.get(t)
        if p is None or not ops.is_default(p):
            return None
        if p.op_type in ops.WINDOWED or p.op_type in ops.GLOBAL_POOLS:
            return {i for i in range(rank) if where[i] >= 2}
        if p.op_type == "Transpose":
            perm = list(attr(p, "perm", []) or reversed(range(rank)))
            where = [perm[a] for a in where]
            t = p.input[0]
            continue
        if p.op_type not in _KEEPS_LAYOUT:
            return None
        same = [i for i in p.input if i and idx.value(i) is None and ctx.rank(i) == rank]
        if not same:
            return None
        t = same[0]
    return None


def head_pool(ctx: Context, node: onnx.NodeProto | None, collapse: Collapse) -> str | None:
    """``"global"`` or ``"covering"`` when ``node`` (the producer of the
    collapse's source) pools the whole map, else None."""
    if node is not None and ops.contrib(node, ops.CONTRIB_GLOBAL_POOLS):
        return "global"
    if node is None or not ops.is_default(node):
        return None
    op = node.op_type
    if op in ops.GLOBAL_POOLS or (op in ops.REDUCES and (collapse.unsqueeze or global_reduce_rank(ctx, node) > 0)):
        return "global"
    if op in ("AveragePool", "MaxPool") and all(d == 1 for d in collapse.feature_shape[1:]):
        return "covering"
    return None


def covers(pool: onnx.NodeProto, size: list) -> bool:
    """A pool with one output position over the whole map: kernel = map, or
    (Caffe-era heads, e.g. inception_v1's k7 with pads [0,0,1,1] on a 6x6
    map) a kernel that overhangs the end into padding that an AveragePool
    does not count (count_include_pad=0) and a MaxPool ignores."""
    kernel = [int(k) for k in attr(pool, "kernel_shape")]
    n = len(kernel)
    pads = [int(p) for p in (attr(pool, "pads", None) or [0] * (2 * n))]
    auto = attr(pool, "auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID") \
            or any(int(d) != 1 for d in (attr(pool, "dilations", None) or [1] * n)):
        return False
    if kernel == size and not any(pads):
        return True
    if pool.op_type == "AveragePool" and int(attr(pool, "count_include_pad", 0)):
        return False
    return all(pads[i] == 0 and size[i] <= kernel[i] <= size[i] + pads[n + i] for i in range(n))


def match_collapse(a: str, ctx: Context) -> Collapse | Refusal:
    """How the FC input ``a`` flattens a map ``F``: walk back through the
    reshapes and per-position ops, take a leading Transpose, check the
    shapes, the batch and the steps, and name the pattern."""
    walked, steps, src = _walk_back(a, ctx)
    perm, transpose, src, producer = _leading_transpose(ctx, walked, src)
    shaped = _map_shape(ctx, walked, src, producer, perm)
    if isinstance(shaped, Refusal):
        return shaped
    fshape, unsqueeze = shaped
    rank = len(fshape)
    if perm is None:
        perm = tuple(range(rank))
    if not all(isinstance(d, int) for d in fshape[1:]):
        raise NeedsShape(src, fshape)
    feature_shape = tuple(int(d) for d in fshape[1:])
    k = int(np.prod(feature_shape))
    forward = [n for n in reversed(walked) if n.op_type in RESHAPE_LIKE or n.op_type == "Transpose"]
    reason = _keeps_batch(ctx, fshape, transpose, forward, k, unsqueeze)
    if reason:
        return Refusal(reason, forward[0] if forward else None)
    made = _steps(ctx, steps, feature_shape, rank, a)
    if isinstance(made, Refusal):
        return made
    layout = _layout(ctx, rank, perm, transpose, producer, unsqueeze)
    nodes = tuple(([transpose] if transpose is not None else []) + list(reversed(walked)))
    col = Collapse(src, perm, feature_shape, nodes, "", layout, unsqueeze, tuple(made))
    return Collapse(src, perm, feature_shape, nodes, _pattern(ctx, walked, transpose, src, col, unsqueeze), layout,
                    unsqueeze, tuple(made))


def _walk_back(a: str, ctx: Context) -> tuple[list, list, str]:
    """From the FC's input back through reshapes and per-position ops:
    (the nodes walked, the steps as (node, its data input), the tensor
    reached), both lists backwards."""
    idx = ctx.idx
    walked: list[onnx.NodeProto] = []
    steps: list[tuple] = []            # (node, its data input), backwards
    t = a
    while True:
        p = idx.producer.get(t)
        if p is None or not ops.is_default(p):
            break
        if p.op_type == "Dropout" and len(p.output) > 1 and p.output[1] and idx.uses(p.output[1]):
            break
        if p.op_type in RESHAPE_LIKE:
            walked.append(p)
            t = p.input[0]
            continue
        data = [i for i in p.input if i and idx.value(i) is None]
        if len(data) > 1 and p.output[0] == t and idx.uses(t) == 1:
            region = _region_ending_at(ctx, t)   # per-position ops that fan out and meet again at t
            if region is None:
                break
            nodes, start = region
            end = t
            while steps and steps[-1][0] is not None and steps[-1][1] == end:
                # the per-position ops after it up to the FC join it, as in a chain
                grown = grow_region(start, ctx, end=steps[-1][0].output[0])
                if not isinstance(grown, tuple):
                    break
                nodes, end = grown[0], steps.pop()[0].output[0]
            steps.append((None, (start, end)))
            seen = {node_key(n) for n in walked}
            walked.extend(n for n in reversed(nodes) if node_key(n) not in seen)
            t = start
            continue
        if len(data) != 1 or p.output[0] != t or idx.uses(t) != 1:
            break
        if p.op_type == "Transpose" and _vector(ctx.shape(t)) and walked:
            walked.append(p)  # on a pooled vector a Transpose only moves size-1 axes: a reshape
            t = data[0]
            continue
        if _per_position(p, data[0], ctx):
            steps.append((p, data[0]))
            walked.append(p)
            t = data[0]
            continue
        break
    return walked, steps, t


def _leading_transpose(ctx: Context, walked: list, src: str):
    """(perm, the Transpose, F, F's producer): a channels-last map is
    ``Transpose(perm)`` of ``F`` before the flatten (perm None without one)."""
    idx = ctx.idx
    producer = idx.producer.get(src)
    perm = None
    transpose = None
    if producer is not None and producer.op_type == "Transpose" and walked:
        p = tuple(attr(producer, "perm", ()) or ())
        rank = ctx.rank(producer.input[0]) or 0
        if not p and rank:
            p = tuple(reversed(range(rank)))
        if len(p) >= 3 and p[0] == 0:
            perm, transpose = p, producer
            src = producer.input[0]
            producer = idx.producer.get(src)
    return perm, transpose, src, producer


def _map_shape(ctx: Context, walked: list, src: str, producer, perm):
    """``(F's shape, unsqueeze)``, or why ``F`` is no flattened spatial map
    (a keepdims=0 reduction's ``[N, C]`` counts with its spatial axes as 1)."""
    fshape = ctx.shape(src)
    what = f"{producer.op_type} {node_label(producer)!r}" if producer is not None else f"graph input {src!r}"
    blocker = producer
    if fshape is None:
        return Refusal(f"the shape of its input map {src!r} is unknown", blocker)
    unsqueeze = 0
    if len(fshape) == 2 and producer is not None and perm is None:
        unsqueeze = global_reduce_rank(ctx, producer, keepdims=0)
        if not unsqueeze:
            return Refusal(f"its input comes from {what} of shape {fmt_shape(fshape)}, not from a flattened "
                           "spatial feature map", blocker)
        fshape = tuple(fshape) + (1,) * unsqueeze
    elif len(fshape) < 3:
        return Refusal(f"its input comes from {what} of shape {fmt_shape(fshape)}, not from a flattened spatial "
                       "feature map", blocker)
    if not any(n.op_type in RESHAPE_LIKE or n.op_type == "Transpose" for n in walked) and not unsqueeze:
        return Refusal(f"its input comes from {what} of shape {fmt_shape(fshape)} without a flatten", blocker)
    return fshape, unsqueeze


def _steps(ctx: Context, steps: list, feature_shape: tuple, rank: int, a: str):
    """The collapse's per-position ops as Steps, or why one cannot stand there.

    Steps act on the map as on the flattened vector where they are
    element-wise with scalars; per-channel constants and ops along the
    features need a pooled (1x1) map."""
    pooled = all(d == 1 for d in feature_shape[1:])
    made = [match_step(n, d, feature_shape[0], rank - 2, ctx, classes=True) if n is not None
            else match_region(d[0], feature_shape[0], rank - 2, ctx, end=d[1]) for n, d in reversed(steps)]
    for st in made:
        if st is None:
            return Refusal(f"the per-position ops before it read a tensor of shape {fmt_shape(ctx.shape(a))}")
        if isinstance(st, Refusal):
            return Refusal(f"{describe(st)} before it", st.node)
        if isinstance(st, Region) and not pooled and st.per_feature:
            return Refusal(f"region ({st.ops}) before it acts on the flattened features of "
                           f"a {'x'.join(map(str, feature_shape[1:]))} map as a whole, which no convolution of the "
                           "map does", st.node)
        if not pooled and not isinstance(st, Region) and (st.constants or st.class_axis
                                                          or st.node.op_type in ops.PER_CHANNEL):
            return Refusal(f"{st.node.op_type} {node_label(st.node)!r} before it acts on the flattened features of "
                           f"a {'x'.join(map(str, feature_shape[1:]))} map as a whole, which no convolution of the "
                           "map does", st.node)
    return made


def _layout(ctx: Context, rank: int, perm: tuple, transpose, producer, unsqueeze: int) -> str:
    """The flatten's axis order in letters (``NCHW``, ``NHWC``...)."""
    letters = "NC" + {1: "L", 2: "HW", 3: "DHW"}.get(rank - 2, "".join(f"S{i}" for i in range(rank - 2)))
    layout = "".join(letters[i] for i in perm) if transpose is not None else letters
    pooled_from = pooled_source(ctx, producer) if unsqueeze else None
    if pooled_from is not None and pooled_from[1] is not None:  # a channels-last map pooled in place
        layout = "".join(letters[pooled_from[1].index(i)] for i in range(rank))
    return layout


def _pattern(ctx: Context, walked: list, transpose, src: str, col: Collapse, unsqueeze: int) -> str:
    """The collapse as ``inspect`` names it: its ops in order (a region's ops
    under one name), a pool before them."""
    idx = ctx.idx
    regions = {node_key(r.nodes[0]): r for r in col.steps if isinstance(r, Region)}
    inner = {node_key(n) for r in regions.values() for n in r.nodes[1:]}
    names = []
    for n in reversed(walked):
        if (n.op_type == "Transpose" and n is not transpose) or node_key(n) in inner:
            continue
        if node_key(n) in regions:
            names.append(f"region({','.join(x.op_type for x in regions[node_key(n)].nodes)})")
        elif n.op_type == "Reshape" and len(n.input) > 1 and idx.value(n.input[1]) is None:
            names.append("Reshape(shape chain)")
        else:
            names.append(n.op_type)
    if transpose is not None:
        names.insert(0, "Transpose")
    pool = idx.producer.get(src)
    if head_pool(ctx, pool, col):
        keep = "" if pool.op_type not in ops.REDUCES else f"(keepdims={0 if unsqueeze else 1})"
        names.insert(0, pool.op_type + keep)
    return "+".join(names) or "-"


def _region_ending_at(ctx: Context, end: str):
    """``(nodes, input)`` of a region (rules/steps.py) whose output is ``end``,
    or None. Walking back over per-position ops from ``end``, every tensor
    where all paths meet is a candidate input; the furthest one from which
    the region grows to ``end`` wins."""
    idx = ctx.idx
    frontier, starts = {end}, []
    for _ in range(64):
        latest = max(frontier, key=lambda x: idx.pos(idx.producer[x]) if x in idx.producer else -1)
        p = idx.producer.get(latest)
        if p is None or p.op_type not in REGION_OPS or not ops.is_default(p):
            break
        frontier.discard(latest)
        frontier.update(i for i in p.input if i and idx.value(i) is None)
        if not frontier:
            break
        if len(frontier) == 1:
            starts.append(next(iter(frontier)))
    for start in reversed(starts):
        grown = grow_region(start, ctx, end=end)
        if isinstance(grown, tuple):
            return grown[0], start
    return None


def _vector(shape) -> bool:
    """A batch of vectors in any layout: one axis besides the batch is > 1."""
    return shape is not None and all(isinstance(d, int) for d in shape[1:]) and \
        sum(1 for d in shape[1:] if d != 1) <= 1


def _per_position(node: onnx.NodeProto, data: str, ctx: Context) -> bool:
    """An op the collapse may carry to the map: element-wise, per channel, or
    along the one non-trivial axis of a pooled vector (LayerNorm over C)."""
    op = node.op_type
    if op in ops.POINTWISE or op in ops.BROADCAST or op in ops.PER_CHANNEL:
        return True
    shape = ctx.shape(data)
    if op not in ops.CLASS_AXIS or op in ops.AFTER_HEAD or not _vector(shape):
        return False
    acted = ops.acted_axes(node, len(shape), ctx.idx.opset, ctx.idx.value)
    wide = {i for i, d in enumerate(shape) if i > 0 and d != 1}
    return acted is not None and 0 not in acted and wide <= acted


def _keeps_batch(ctx: Context, fshape, transpose, forward, k, unsqueeze) -> str | None:
    """None if the collapse maps F [b, ...] to [b, K] for every batch b it can see."""
    batch_sym = fshape[0]
    batches = [batch_sym] if isinstance(batch_sym, int) else [1, 2, 3]
    for b in batches:
        shape = [b] + [int(d) for d in fshape[1:]]
        if unsqueeze:
            shape = shape[:2]
        if transpose is not None:
            shape = [shape[i] for i in attr(transpose, "perm")]
        for n in forward:
            try:
                shape = _apply_shape(ctx, n, shape, b, batch_sym)
            except _Unknown as exc:
                return str(exc)
        if shape != [b, k]:
            if b != 1 and not isinstance(batch_sym, int):
                n = next((x for x in forward if x.op_type == "Reshape"), forward[-1] if forward else None)
                return (f"{n.op_type if n else 'the collapse'} {node_label(n) if n else ''!r} gives shape {shape} "
                        f"for batch {b}: it folds the batch axis into the features; "
                        f"if the model only runs at batch 1, fix the batch with --input-shape")
            return f"the collapse of the feature map gives shape {shape}, not [{b}, {k}]"
    return None


def _apply_shape(ctx: Context, node, shape, b, batch_sym):
    op = node.op_type
    rank = len(shape)
    if op in ("Identity", "Dropout"):
        return shape
    if op == "Transpose":
        perm = list(attr(node, "perm", []) or reversed(range(rank)))
        return [shape[i] for i in perm]
    if op == "Flatten":
        ax = int(attr(node, "axis", 1))
        ax = ax + rank if ax < 0 else ax
        return [int(np.prod(shape[:ax])), int(np.prod(shape[ax:]))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(x) for x in eval_shape_tensor(ctx, node.input[1], b, batch_sym).reshape(-1)]
        if op == "Squeeze":
            if not axes:
                return [d for d in shape if d != 1]
            gone = ops.norm_axes(axes, rank)
            return [d for i, d in enumerate(shape) if i not in gone]
        out_rank = rank + len(axes)
        new = ops.norm_axes(axes, out_rank)
        it = iter(shape)
        return [1 if i in new else next(it) for i in range(out_rank)]
    if op == "Reshape":
        if len(node.input) > 1 and node.input[1]:
            target = [int(x) for x in eval_shape_tensor(ctx, node.input[1], b, batch_sym).reshape(-1)]
        else:  # Reshape-1 (opset < 5) holds its shape as an attribute
            target = [int(x) for x in attr(node, "shape", [])]
        allowzero = int(attr(node, "allowzero", 0))
        out = [shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(target)]
        total = int(np.prod(shape))
        if out.count(-1) == 1:
            rest = int(np.prod([d for d in out if d != -1]))
            if rest == 0 or total % rest:
                raise _Unknown(f"Reshape {node_label(node)!r} cannot reshape {shape} to {target}")
            out[out.index(-1)] = total // rest
        if int(np.prod(out)) != total:
            raise _Unknown(f"Reshape {node_label(node)!r} cannot reshape {shape} to {target}")
        return out
    raise _Unknown(f"{op} {node_label(node)!r} in the collapse")


def strided_view_of(ctx: Context, node: onnx.NodeProto) -> str | None:
    """``x`` when ``node`` is ``Gather(Reshape(x, [-1]), indices, axis=0)``
    whose indices are ``arange(x.size)`` in ``x``'s shape for every batch size
    (PyTorch's dynamo exporter writes ``as_strided`` views this way): the
    identity of ``x``, computed for the native size only. Else None."""
    idx = ctx.idx
    if node.op_type != "Gather" or not ops.is_default(node) or int(attr(node, "axis", 0)) != 0:
        return None
    flat = idx.producer.get(node.input[0])
    if flat is None or flat.op_type != "Reshape" or not ops.is_default(flat) or len(flat.input) < 2:
        return None
    x = flat.input[0]
    shape = ctx.shape(x)
    target = idx.value(flat.input[1])
    if shape is None or target is None or [int(d) for d in target.reshape(-1)] != [-1] \
            or not all(isinstance(d, int) for d in shape[1:]):
        return None
    batch = shape[0]
    for b in ([batch] if isinstance(batch, int) else [1, 2, 3]):
        try:
            ind = eval_shape_tensor(ctx, node.input[1], b, batch)
        except _Unknown:
            return None
        dims = (b,) + tuple(shape[1:])
        if tuple(ind.shape) != dims or not np.array_equal(ind.reshape(-1), np.arange(int(np.prod(dims)))):
            return None
    return x


def eval_shape_tensor(ctx: Context, name: str, b: int, batch_sym) -> np.ndarray:
    """The value of a shape tensor when the batch is ``b``: a constant, or
    an expression of constants and ``Shape`` of tensors whose only non-static
    dim is the batch."""
    idx = ctx.idx
    v = idx.value(name)
    if v is not None:
        return v
    feeds: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()
    stack = [name]
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        cv = idx.value(t)
        if cv is not None:
            feeds[t] = cv
            continue
        node = idx.producer.get(t)
        if node is None:
            raise _Unknown(f"the reshape shape {name!r} depends on graph input {t!r}")
        if node.op_type == "Shape":
            shp = ctx.shape(node.input[0])
            if shp is None:
                raise _Unknown(f"the reshape shape {name!r} reads the unknown shape of {node.input[0]!r}")
            dims = []
            for i, d in enumerate(shp):
                if isinstance(d, int):
                    dims.append(d)
                elif i == 0 and (d == batch_sym or not isinstance(batch_sym, int)):
                    dims.append(b)
                else:
                    raise _Unknown(f"the reshape shape {name!r} depends on symbolic dim {d!r} of {node.input[0]!r}")
            full = np.array(dims, dtype=np.int64)
            start, end = attr(node, "start", 0), attr(node, "end", None)
            feeds[node.output[0]] = full[start:end]
            continue
        if node.op_type not in ops.FOLDABLE or not ops.is_default(node) or len(nodes) > 64:
            raise _Unknown(f"the reshape shape {name!r} is computed by {node.op_type} {node_label(node)!r}")
        nodes.append(node)
        stack.extend(node.input)
    order = sorted(nodes, key=idx.pos)
    try:
        return run_nodes(order, feeds, name, idx.opset)
    except Exception as exc:  # the reference runtime's message is the reason
        raise _Unknown(f"the reshape shape {name!r} could not be evaluated ({str(exc).splitlines()[0]})") from None
