"""Find FC heads: run the pattern rules (rules/) over the graph and gather
what they match into heads; an FC that cannot be converted becomes a
:class:`Layer` with its reason. Matching never mutates the graph.

A head is a collapse of a spatial feature map (rules/collapse.py), its first
FC (rules/fc.py), then a chain of FCs and per-position steps
(rules/steps.py) for as long as each tensor has one consumer.

Where the chain forks (a multi-task head: one shared FC, then a classifier,
a box regressor and landmarks, as MTCNN's R-Net/O-Net write it), each
consumer of the shared tensor that leads, through per-position steps, to an
FC starts a :class:`Branch`: a chain of its own from the shared map, which
may fork again. Its FCs are 1x1 convolutions like any later FC: on the
shared ``[N, M]`` vector they see each feature once, as a 1x1 Conv sees each
channel of the shared ``[N, M, 1, ...]`` map (keep), or of the shared score
map at every position (dense).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import Fc2ConvError
from .graph import GraphIndex, node_key, node_label
from .rules import Context, Refusal
from .rules.collapse import Collapse, NeedsShape, fmt_shape, match_collapse
from .rules.fc import FC, match_fc
from .rules.steps import AFTER_HEAD, Region, describe, match_region, match_step
from .shapes import TensorInfo


@dataclass(frozen=True)
class Branch:
    """A chain that starts where a head forks: it reads ``start`` (``[N,
    m_in]``, the end of the chain it forks from) and ends at ``end``."""
    start: str
    m_in: int
    items: tuple                 # Steps and FCs, in graph order (at least one FC)
    end: str
    branches: tuple = ()         # where this branch forks again

    @property
    def fcs(self) -> tuple:
        return tuple(i for i in self.items if isinstance(i, FC))


@dataclass(frozen=True)
class Head:
    collapse: Collapse
    items: tuple                 # FC and Step, in graph order
    end: str                     # the original tensor the final Flatten writes
    branches: tuple = ()         # Branches from ``end`` where the head forks

    @property
    def fcs(self) -> tuple:
        """The FCs of the shared chain (not of its branches)."""
        return tuple(i for i in self.items if isinstance(i, FC))

    def all_branches(self) -> list:
        """Every Branch, depth first (a branch before those that fork from it)."""
        out, stack = [], list(reversed(self.branches))
        while stack:
            b = stack.pop()
            out.append(b)
            stack.extend(reversed(b.branches))
        return out

    @property
    def spatial_rank(self) -> int:
        return len(self.collapse.feature_shape) - 1


@dataclass
class Layer:
    """What the tool found for one FC layer: what it becomes, or why not."""
    name: str
    op: str
    pattern: str = "-"
    input_shape: list = field(default_factory=list)
    layout: str = "-"
    converted: bool = False
    reason: str | None = None
    kernel: list | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    head: int | None = None
    conv: str = "Conv"           # the op it becomes: Conv, QLinearConv, ConvInteger, DequantizeLinear+Conv

    @property
    def becomes(self) -> str:
        if not self.converted:
            return "not converted: " + (self.reason or "")
        k = "x".join(str(d) for d in self.kernel)
        return f"{self.conv} {k}, {self.in_channels} -> {self.out_channels} channels"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "op", "pattern", "input_shape", "layout", "converted",
                                            "reason", "kernel", "in_channels", "out_channels", "head", "conv")}
        d["becomes"] = self.becomes
        return d


class NeedsInputShape(Fc2ConvError):
    """The first FC's map has symbolic spatial dims: the native input size
    must be given (or derived from the FC's K, see api.convert)."""

    def __init__(self, message: str, fc_name: str, k: int, tensor: str):
        super().__init__(message)
        self.fc_name, self.k, self.tensor = fc_name, k, tensor


def item_nodes(item) -> tuple:
    return item.nodes   # an FC's nodes, a Step's one node, a Region's nodes


def find_heads(model_or_ctx, shapes: dict[str, TensorInfo] | None = None, *,
               all_fcs: bool = False) -> tuple[list[Head], list[Layer]]:
    """Every FC layer of the model: heads to convert, and a record per FC.

    Takes a :class:`rules.Context` (one per conversion), or a model and its
    shapes. ``all_fcs`` (keep mode): an FC on a plain ``[N, K]`` vector is a
    head too, on that vector seen as a ``[N, K, 1, 1]`` map (rules/vecfc.py)."""
    ctx = model_or_ctx if isinstance(model_or_ctx, Context) else Context(GraphIndex(model_or_ctx), shapes)
    idx = ctx.idx
    heads: list[Head] = []
    layers: list[Layer] = []
    claimed: set[str] = set()
    stops: dict[str, tuple[str, Refusal]] = {}   # tensor where a chain stopped -> (its FC, why)
    for node in idx.graph.node:
        if node_key(node) in claimed:
            continue
        fc = match_fc(node, ctx)
        if fc is None:
            continue
        if isinstance(fc, Refusal):
            layers.append(Layer(node_label(node), node.op_type, input_shape=fmt_shape(ctx.shape(node.input[0])),
                                reason=fc.reason))
            continue
        try:
            col = match_collapse(fc.input, ctx)
        except NeedsShape as exc:
            raise NeedsInputShape(_needs_shape_message(idx.model, fc, exc), fc.name, fc.k, exc.tensor) from None
        if isinstance(col, Refusal) and all_fcs:
            from .rules.vecfc import vector_collapse

            col = vector_collapse(fc, ctx) or col
        if isinstance(col, Refusal):
            layers.append(Layer(fc.name, fc.op, input_shape=fmt_shape(ctx.shape(fc.input)),
                                reason=_blocker(ctx, fc.input, stops) or col.reason))
            continue
        k = int(np.prod(col.feature_shape))
        if fc.k != k:
            raise Fc2ConvError(
                f"FC {fc.name!r} has weight K={fc.k}, but the feature map {col.source!r} it consumes has "
                f"C*prod(spatial) = {'*'.join(map(str, col.feature_shape))} = {k}: the model is inconsistent")
        head_no = len(heads)
        shape = fmt_shape(ctx.shape(col.source)) + [1] * col.unsqueeze
        layers.append(Layer(fc.name, fc.op, col.pattern, shape, col.layout, True, None,
                            list(col.feature_shape[1:]), col.feature_shape[0], fc.m, head_no, _conv_op(fc)))
        items, t, branches = _chain(ctx, fc, len(col.feature_shape) - 1, head_no, layers, stops)
        head = Head(col, tuple(items), t, branches)
        for it in list(items) + [it for b in head.all_branches() for it in b.items]:
            claimed.update(node_key(n) for n in item_nodes(it))
        heads.append(head)
    return heads, layers


def find_map_fcs(ctx: Context, layers: list) -> list:
    """FCs over rank-4/5 maps (rules/mapfc.py), each a 1x1 Conv; their layer
    records (refused by the head rules as "not on a flattened map") say so."""
    from .rules.mapfc import match_map_fc

    found = []
    by_name = {layer.name: layer for layer in layers if not layer.converted}
    for node in ctx.idx.graph.node:
        fc = match_map_fc(node, ctx)
        if fc is None or fc.name not in by_name:
            continue
        layer = by_name[fc.name]
        layer.op, layer.pattern, layer.layout = fc.op, f"map (rank {fc.rank}, features last)", "channels-last"
        layer.converted, layer.reason = True, None
        layer.kernel, layer.in_channels, layer.out_channels = [1] * (fc.rank - 2), fc.k, fc.m
        found.append(fc)
    return found


def find_vec_fcs(ctx: Context, layers: list) -> list:
    """``--all-fcs``: MatMuls on token sequences ``[N, T, C]`` and Gemms with
    transA = 1 (rules/vecfc.py), each a 1x1 Conv between Transposes; their
    layer records (refused by the head rules) say so."""
    from .rules.vecfc import match_token_fc, match_trans_a

    found = []
    by_name = {layer.name: layer for layer in layers if not layer.converted}
    for node in ctx.idx.graph.node:
        fc = match_token_fc(node, ctx) or match_trans_a(node, ctx)
        if fc is None or fc.name not in by_name:
            continue
        layer = by_name[fc.name]
        token = not hasattr(fc, "node")
        layer.pattern = "tokens (rank 3, features last)" if token else "Gemm transA=1 on a vector"
        layer.layout = "channels-last" if token else "NC"
        layer.converted, layer.reason = True, None
        layer.kernel, layer.in_channels, layer.out_channels = [1] if token else [1, 1], fc.k, fc.m
        if token:
            layer.op = fc.op
        found.append(fc)
    return found


def _conv_op(fc: FC) -> str:
    quant = getattr(fc, "quant", None)
    if quant is None:
        return "Conv"
    return {"qdq": "DequantizeLinear+Conv", "qlinear": "QLinearConv", "qgemm": "QLinearConv",
            "integer": "ConvInteger"}.get(quant.format, "Conv")


def _chain(ctx: Context, fc: FC, spatial: int, head_no: int, layers: list, stops: dict):
    """The FCs and steps after a head's first FC, for as long as each tensor
    has one consumer, and the branches where it forks: (items, end, branches).
    Records where and why it stopped."""
    items, t, m = _follow(ctx, [fc], fc.output, fc.m, spatial, head_no, layers, stops)
    return items, t, _fork(ctx, t, m, spatial, head_no, layers, stops)


def _follow(ctx: Context, items: list, t: str, m: int, spatial: int, head_no: int, layers: list, stops: dict):
    """Extend ``items`` (ending in ``t`` of ``m`` features) along single
    consumers: (items, end tensor, its features)."""
    idx = ctx.idx
    last = next(i for i in reversed(items) if isinstance(i, FC))
    while True:
        nxt = idx.only_consumer(t)
        if nxt is None or t in idx.outputs:
            # the features fan out to per-position ops that meet again (GELU, a decomposed LayerNorm...)
            region = match_region(t, m, spatial, ctx) if t not in idx.outputs else None
            if isinstance(region, Region):
                items.append(region)
                t = region.output
                continue
            if isinstance(region, Refusal) and region.node is not None and match_fc(region.node, ctx) is None:
                stops[t] = (last.name, region)
            break
        nfc = match_fc(nxt, ctx)
        if isinstance(nfc, FC) and nfc.input == t:
            _add_layer(ctx, nfc, t, m, spatial, head_no, layers, "chain")
            items.append(nfc)
            t, m, last = nfc.output, nfc.m, nfc
            continue
        if nfc is not None:
            break
        step = match_step(nxt, t, m, spatial, ctx, classes=True)
        if isinstance(step, Refusal):
            stops[t] = (last.name, step)
            break
        if step.class_axis and nxt.op_type in AFTER_HEAD:
            break
        items.append(step)
        t = nxt.output[0]
    return items, t, m


def _add_layer(ctx: Context, fc: FC, t: str, m: int, spatial: int, head_no: int, layers: list, pattern: str):
    if fc.k != m:
        raise Fc2ConvError(f"FC {fc.name!r} has weight K={fc.k}, but its input {t!r} has {m} features: "
                           "the model is inconsistent")
    layers.append(Layer(fc.name, fc.op, pattern, [fmt_shape(ctx.shape(t))[0] if ctx.shape(t) else "?", m],
                        "-", True, None, [1] * spatial, m, fc.m, head_no, _conv_op(fc)))


def _fork(ctx: Context, t: str, m: int, spatial: int, head_no: int, layers: list, stops: dict,
          depth: int = 0) -> tuple:
    """Branches from ``t`` where it has several consumers (or is a graph
    output and feeds more): each consumer that reaches an FC through
    per-position steps starts one. The other consumers keep reading ``t``."""
    idx = ctx.idx
    consumers = idx.consumers.get(t, ())
    if depth > 16 or not consumers or (len(consumers) < 2 and t not in idx.outputs) or t in idx.sub_reads:
        return ()
    branches, seen = [], set()
    for node in consumers:
        if node_key(node) in seen:
            continue
        seen.add(node_key(node))
        pre = _to_fc(ctx, node, t, m, spatial)
        if pre is None:
            continue
        steps, fc = pre
        _add_layer(ctx, fc, fc.input, m, spatial, head_no, layers, "branch")
        items, end, m_end = _follow(ctx, steps + [fc], fc.output, fc.m, spatial, head_no, layers, stops)
        sub = _fork(ctx, end, m_end, spatial, head_no, layers, stops, depth + 1)
        branches.append(Branch(t, m, tuple(items), end, sub))
    return tuple(branches)


def _to_fc(ctx: Context, node, t: str, m: int, spatial: int, limit: int = 32):
    """(leading Steps, FC) when ``node`` (reading ``t``) reaches an FC through
    per-position steps, each the only consumer of the one before; else None.
    Matching only: nothing is recorded."""
    idx = ctx.idx
    steps = []
    for _ in range(limit):
        fc = match_fc(node, ctx)
        if isinstance(fc, FC) and fc.input == t:
            return steps, fc
        if fc is not None:
            return None
        step = match_step(node, t, m, spatial, ctx, classes=True)
        if isinstance(step, Refusal) or (step.class_axis and node.op_type in AFTER_HEAD):
            return None
        steps.append(step)
        t = node.output[0]
        node = idx.only_consumer(t)
        if node is None or t in idx.outputs:
            return None
    return None


def _blocker(ctx: Context, tensor: str, stops: dict, depth: int = 8) -> str | None:
    """Where an FC's input comes, through a few ops, from a tensor at which an
    earlier head's chain stopped: that stop is the real blocker."""
    for _ in range(depth):
        if tensor in stops:
            fc_name, refusal = stops[tensor]
            return (f"it follows FC {fc_name!r}, whose chain stops at {describe(refusal)}, so this FC does not see "
                    "a flattened feature map")
        node = ctx.idx.producer.get(tensor)
        if node is None or not node.input:
            return None
        tensor = node.input[0]
    return None


def _needs_shape_message(model, fc: FC, exc: NeedsShape) -> str:
    from .shapes import input_infos
    hints = []
    for name, info in input_infos(model).items():
        if info.shape is not None and not all(isinstance(d, int) for d in info.shape[1:]):
            dims = ["1" if i == 0 and not isinstance(d, int) else (str(d) if isinstance(d, int) else f"<{d or 'size'}>")
                    for i, d in enumerate(info.shape)]
            hints.append(f"--input-shape {name}={','.join(dims)}")
    hint = (" give the native input size, e.g. " + " ".join(hints)) if hints else " give the native input size with --input-shape"
    return (f"FC {fc.name!r} consumes {exc.tensor!r} of shape {fmt_shape(exc.shape)} whose spatial size depends on "
            f"symbolic input dims;{hint}")
