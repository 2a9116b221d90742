"""Where each position of a dense score map looks in the input image, and
whether the trunk lets a position be a position at all.

Along every path from the image input to the head's window source, each
Conv/Pool with kernel ``k``, dilation ``d``, stride ``s`` and leading pad
``p`` updates, per spatial axis (the standard receptive-field recursion)::

    k_eff  = d * (k - 1) + 1
    rf'    = rf + (k_eff - 1) * jump
    offset'= offset - p * jump
    jump'  = jump * s

starting from ``jump = 1, rf = 1, offset = 0`` at the input. The head's Conv
(kernel = the native map size ``h``, stride 1) adds ``(h - 1) * jump`` to the
receptive field. Position ``i`` of the score map then sees input pixels
``[offset + i * stride, offset + i * stride + rf - 1]`` along that axis
(negative or past-the-end pixels are the trunk's zero padding).

Where paths join (residual Add, Concat) strides must agree; the receptive
field is the widest and the offset the smallest of the joined paths.

:func:`trace` is one forward pass over the trunk's nodes in graph order (no
recursion, so a 1000-block chain is fine). It is an allow-list: an op whose
input has spatial axes is accepted only if the per-op table (ops.py) knows it
acts per position on them, or it is a windowed op whose geometry is known, or
a reshuffle that leaves the spatial axes alone. Anything else is refused,
naming the node and the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import ops
from .errors import Fc2ConvError
from .graph import GraphIndex, attr, node_label


@dataclass(frozen=True)
class Axis:
    """One input axis as seen by one tensor axis."""
    input: str
    input_axis: int
    stride: int
    receptive_field: int
    offset: int
    padded: bool = False

    def to_dict(self) -> dict:
        return {"input": self.input, "input_axis": self.input_axis, "stride": self.stride,
                "receptive_field": self.receptive_field, "offset": self.offset}


@dataclass(frozen=True)
class MapAxis:
    """One spatial axis of a score map, in input pixels: position ``p`` sees
    pixels ``[offset + p*stride, offset + p*stride + receptive_field - 1]``
    of input axis ``input_axis`` of ``input``. ``window`` is the head's
    window on the trunk map (None for a model that was dense already);
    ``plain_stride`` the trunk's stride where ``--dense-stride`` made the map
    finer (None otherwise)."""
    input: str
    input_axis: int
    stride: int
    receptive_field: int
    offset: int
    window: int | None = None
    plain_stride: int | None = None

    @property
    def trunk_stride(self) -> int:
        """The stride of the trunk (the plain map's stride under à trous)."""
        return self.plain_stride if self.plain_stride is not None else self.stride

    def to_dict(self) -> dict:
        d = {"input": self.input, "input_axis": self.input_axis, "stride": self.stride,
             "receptive_field": self.receptive_field, "offset": self.offset, "window": self.window}
        if self.plain_stride is not None:
            d["plain_stride"] = self.plain_stride
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MapAxis":
        return cls(d["input"], int(d["input_axis"]), int(d["stride"]), int(d["receptive_field"]),
                   int(d["offset"]), d.get("window"), d.get("plain_stride"))


BOX = ("position p along an axis covers input pixels [offset + p*stride, "
       "offset + p*stride + receptive_field - 1]")


@dataclass(frozen=True)
class MapGeometry:
    """Where the score maps of one head look in the input: typed inside the
    package; ``to_dict()`` is the form of reports and JSON
    (``ConversionResult.geometry``)."""
    outputs: tuple
    axes: tuple                    # MapAxis per spatial axis of the map
    window_source: str | None = None
    window: tuple | None = None
    padded: bool = False
    dense_stride: int | None = None

    def to_dict(self) -> dict:
        d = {"outputs": list(self.outputs), "window_source": self.window_source,
             "window": list(self.window) if self.window is not None else None,
             "axes": [a.to_dict() for a in self.axes], "padded": self.padded, "box": BOX}
        if self.dense_stride is not None:
            d["dense_stride"] = self.dense_stride
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MapGeometry":
        return cls(tuple(d["outputs"]), tuple(MapAxis.from_dict(a) for a in d["axes"]), d.get("window_source"),
                   tuple(d["window"]) if d.get("window") is not None else None, bool(d.get("padded", False)),
                   d.get("dense_stride"))


def compose(layers, start: Axis) -> Axis:
    """Apply ``(kernel, stride, pad_begin, dilation)`` layers in order."""
    a = start
    for k, s, p, d in layers:
        k_eff = d * (k - 1) + 1
        a = Axis(a.input, a.input_axis, a.stride * s, a.receptive_field + (k_eff - 1) * a.stride,
                 a.offset - p * a.stride, a.padded or p > 0)
    return a


Geo = dict  # tensor axis -> Axis, for the tensor's spatial axes


@dataclass
class Trace:
    """What the forward pass found: the geometry of every trunk tensor with
    spatial axes, the channel-shuffle Reshapes dense mode rewrites, the global
    pools kept global (``keep_global``), and, in lenient mode, the refusals it
    recorded instead of raising."""
    geo: dict = field(default_factory=dict)        # tensor -> Geo
    reshapes: list = field(default_factory=list)   # (Reshape node, spatial rank, middle dims)
    kept_global: list = field(default_factory=list)  # node labels
    refusals: list = field(default_factory=list)   # sentences (lenient mode)


class _Refused(Exception):
    pass


def trace(idx: GraphIndex, shapes, sources, *, keep_global: bool = False, lenient: bool = False,
          spatial: dict | None = None) -> Trace:
    """Geometry of the trunk that computes ``sources`` (the maps the heads read).

    Args:
        spatial: source -> its spatial axes where they are not ``2..`` (a
            channels-last map pooled in place: ``(1, 2)``).
        keep_global: global pools in the trunk (squeeze-excitation) stay global
            over the whole input: accepted, their outputs carry no position.
        lenient: record what is not per position in ``Trace.refusals`` and go
            on as if it were (the dense check uses this to test a model that
            was made dense anyway); otherwise raise :class:`Fc2ConvError`.
    """
    cone = _cone(idx, sources)
    # Pass 1 learns which input axes reach the heads' spatial axes (an NHWC
    # input's channel axis does not); pass 2 checks with only those spatial.
    # Only the maps' spatial axes (2.., or those given) count: a residual from the input
    # (Add(Relu(Conv(x)), x)) carries the input's channel axis into the map's.
    first = _Pass(idx, shapes, cone, None, keep_global=True, lenient=True).run()
    spatial = spatial or {}
    wanted = {(a.input, a.input_axis) for s in sources for axis, a in first.geo.get(s, {}).items()
              if (axis in spatial[s] if s in spatial else axis >= 2)}
    return _Pass(idx, shapes, cone, wanted, keep_global=keep_global, lenient=lenient).run()


def _cone(idx: GraphIndex, sources) -> list:
    """Nodes that compute ``sources``, in graph order (iterative walk)."""
    keep, stack, seen = set(), list(sources), set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = idx.producer.get(t)
        if node is None:
            continue
        pos = idx.pos(node)
        if pos in keep:
            continue
        keep.add(pos)
        stack.extend(i for i in node.input if i)
    return [idx.graph.node[p] for p in sorted(keep)]


def pooled_segment(idx: GraphIndex, shapes, end: str, limit: int = 64):
    """The per-position ops between whole-map pools and ``end`` (a head that
    pools, then applies a 1x1 ``conv_head``, a norm, an activation, or joins
    an average and a max pool, before it flattens).

    Returns ``(pools, nodes)``: the pools (GlobalAveragePool/GlobalMaxPool, or
    ReduceMean/ReduceMax over every spatial axis with keepdims) that all read
    one map, and the nodes after them in graph order; or None when ``end`` is
    not computed that way. Raises Fc2ConvError naming a node of such a
    segment that does not act per position."""
    from .rules import Context
    from .rules.collapse import strided_view_of

    ctx = Context(idx, shapes)
    pools, nodes, views, stack, seen = [], [], {}, [end], set()
    while stack:
        t = stack.pop()
        if t in seen or idx.value(t) is not None:
            continue
        seen.add(t)
        node = idx.producer.get(t)
        if node is None or len(seen) > limit:
            return None
        if _whole_map_pool(idx, shapes, node):
            pools.append(node)
            continue
        view = strided_view_of(ctx, node)
        if view is not None:  # an identity view: follow what it views
            views[t] = (node, view)
            stack.append(view)
            continue
        nodes.append(node)
        stack.extend(i for i in node.input if i)
    if not pools or len({p.input[0] for p in pools}) != 1:
        return None
    nodes.sort(key=idx.pos)
    pools.sort(key=idx.pos)
    check = _Pass(idx, shapes, nodes, set(), keep_global=False, lenient=False)
    rank = len(check.shape(pools[0].output[0]) or ())
    seed = {p.output[0]: {a: Axis("", a, 1, 1, 0) for a in range(2, rank)} for p in pools}
    found = check.run(seed, {t: v for t, (_, v) in views.items()})
    axes = found.geo.get(views[end][1] if end in views else end, {})
    if sorted(axes) != list(range(2, rank)) or any((a.stride, a.receptive_field, a.offset) != (1, 1, 0)
                                                   for a in axes.values()):
        return None  # a window wider than one position after the pool: not the original's arithmetic
    return pools, nodes, [node for node, _ in views.values()]


def _whole_map_pool(idx: GraphIndex, shapes, node) -> bool:
    if not ops.is_default(node):
        return False
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        return True
    if node.op_type in ("AveragePool", "MaxPool"):  # a window covering the map (PyTorch's adaptive pools)
        from .rules.collapse import covers

        info = shapes.get(node.input[0])
        size = list(info.shape[2:]) if info is not None and info.shape is not None else None
        return size is not None and all(isinstance(d, int) for d in size) and covers(node, size)
    if node.op_type in ("ReduceMean", "ReduceMax") and int(attr(node, "keepdims", 1)):
        info = shapes.get(node.input[0])
        rank = len(info.shape) if info is not None and info.shape is not None else 0
        return rank >= 3 and ops.acted_axes(node, rank, idx.opset, idx.value) == set(range(2, rank))
    return False


class _Pass:
    def __init__(self, idx: GraphIndex, shapes, cone, wanted, *, keep_global, lenient):
        from .rules import Context

        self.idx, self.ctx, self.cone, self.wanted = idx, Context(idx, shapes), cone, wanted
        self.shape = self.ctx.shape
        self.keep_global, self.lenient = keep_global, lenient
        self.out = Trace()

    def rank(self, name) -> int:
        return self.ctx.rank(name) or 0

    def run(self, seed: dict | None = None, aliases: dict | None = None) -> Trace:
        """``aliases``: tensor -> the tensor it is an identity view of."""
        geo = self.out.geo
        geo.update(seed or {})
        aliases = aliases or {}
        for name in self.idx.inputs:
            axes = range(1, self.rank(name))
            geo[name] = {a: Axis(name, a, 1, 1, 0) for a in axes
                         if self.wanted is None or (name, a) in self.wanted}
        for node in self.cone:
            if self.idx.value(node.output[0]) is not None if node.output else True:
                continue  # a constant expression
            ins = [geo.get(aliases.get(i, i)) or {} for i in node.input]
            if not any(ins):
                continue  # no input has positions: neither has its output
            try:
                outs = self.node(node, ins)
            except _Refused as exc:
                if not self.lenient:
                    raise Fc2ConvError(str(exc)) from None
                self.out.refusals.append(str(exc))
                outs = [self.join(node, ins, check=False)] * len(node.output)
            for name, g in zip(node.output, outs):
                if name and g:
                    geo[name] = g
        return self.out

    def refuse(self, node, why: str, hint: str = ""):
        raise _Refused(f"{node.op_type} {node_label(node)!r} in the trunk {why}, so the model cannot be made "
                       f"dense{'; ' + hint if hint else ''}")

    # -- one node -----------------------------------------------------------
    def node(self, node, ins) -> list:
        op = node.op_type
        if ops.contrib(node, ops.CONTRIB_POINTWISE):   # onnxruntime's QLinearAdd, QLinearSigmoid...
            data = ops.CONTRIB_POINTWISE[op]
            return [self.join(node, [g if i in data else {} for i, g in enumerate(ins)])]
        if ops.contrib(node, ops.CONTRIB_WINDOWED):
            return [self.windowed(node, ins[0])]
        if ops.contrib(node, ops.CONTRIB_GLOBAL_POOLS):
            return [self.global_pool(node, ins[0])]
        if not ops.is_default(node):
            self.refuse(node, f"is a custom op ({node.domain}:{op}) not known to act per position")
        if op in ops.POINTWISE:
            return [self.join(node, ins[:1])] * len(node.output)
        if op in ops.BROADCAST:
            return [self.join(node, ins)] + [{}] * (len(node.output) - 1)
        if op in ops.PER_CHANNEL:
            if 1 in ins[0] and self.wanted is not None:
                self.refuse(node, "scales along a spatial axis")
            return [self.join(node, ins[:1])] + [{}] * (len(node.output) - 1)
        if op in ops.WINDOWED:
            return [self.windowed(node, ins[0])] + [{}] * (len(node.output) - 1)
        if op in ops.GLOBAL_POOLS:
            return [self.global_pool(node, ins[0])]
        if op in ops.AXIS_OPS:
            return self.axis_op(node, ins)
        if op == "DynamicQuantizeLinear":
            self.refuse(node, "takes its scale and zero point from the whole tensor (dynamic quantization)")
        handler = {"Transpose": self.transpose, "Pad": self.pad, "Reshape": self.reshape,
                   "Squeeze": self.squeeze, "Unsqueeze": self.squeeze, "Slice": self.select,
                   "Gather": self.select, "Shape": lambda n, i: [{}], "Size": lambda n, i: [{}]}.get(op)
        if handler is None:
            self.refuse(node, f"is not known to act per position (op {op})")
        return handler(node, ins)

    def join(self, node, ins, check: bool = True) -> Geo:
        """Geometry of an element-wise combination (broadcast, right-aligned)."""
        rank = self.rank(node.output[0]) or max((self.rank(i) for i in node.input if i), default=0)
        out: Geo = {}
        for name, src in zip(node.input, ins):
            shift = rank - self.rank(name) if rank else 0
            for axis, a in src.items():
                axis += shift
                b = out.get(axis)
                if b is None:
                    out[axis] = a
                    continue
                if (a.input, a.input_axis) != (b.input, b.input_axis) or a.stride != b.stride:
                    raise Fc2ConvError(f"{node.op_type} {node_label(node)!r} joins maps of different strides "
                                       f"({a.stride} and {b.stride}); the dense geometry is undefined")
                out[axis] = Axis(a.input, a.input_axis, a.stride, max(a.receptive_field, b.receptive_field),
                                 min(a.offset, b.offset), a.padded or b.padded)
        if check:
            for name, src in zip(node.input, ins):
                if name and not src:
                    self.flat_along(node, name, out, rank)
        return out

    def flat_along(self, node, name, spatial: Geo, rank: int) -> None:
        """An operand without positions must not vary along the spatial axes
        (a positional constant would make each position different)."""
        shape = self.idx.const_shape(name) if self.idx.is_const(name) else self.shape(name)
        if shape is None:
            if self.idx.is_const(name):
                return
            self.refuse(node, f"combines the map with {name!r}, whose shape is unknown")
        shift = rank - len(shape)
        for axis in spatial:
            i = axis - shift
            if 0 <= i < len(shape) and shape[i] != 1:
                what = "a constant" if self.idx.is_const(name) else "a tensor without positions"
                self.refuse(node, f"combines the map with {what} {name!r} of shape {list(shape)} "
                                  f"that varies along spatial axis {axis}")

    def axis_op(self, node, ins) -> list:
        op = node.op_type
        data = ins[0]
        rank = self.rank(node.input[0])
        if op == "MatMul":
            if ins[1] or not self.idx.is_const(node.input[1]) or len(self.idx.const_shape(node.input[1])) != 2:
                self.refuse(node, "multiplies the map by a tensor that is not a constant matrix")
        if op == "Concat":
            acted = ops.acted_axes(node, self.rank(node.output[0]), self.idx.opset, self.idx.value)
        else:
            acted = ops.acted_axes(node, rank, self.idx.opset, self.idx.value) if rank else None
        if acted is None:
            self.refuse(node, "acts along axes that are not known statically")
        mixed = sorted(acted & set(data if op != "Concat" else self.join(node, ins, check=False)))
        if mixed:
            if op in ops.REDUCES and set(data) <= acted:
                return [self.global_pool(node, data)]
            where = f"spatial axis {mixed[0]}" if len(mixed) == 1 else f"spatial axes {mixed}"
            self.refuse(node, f"acts along {where} (axes {sorted(acted)} of a rank-{rank} tensor at opset "
                              f"{self.idx.opset})")
        if op == "Concat":
            return [self.join(node, ins)]
        if op in ("LayerNormalization", "BatchNormalization"):
            return [self.join(node, ins[:1])] + [{}] * (len(node.output) - 1)
        gone = ops.removes_axes(node, acted)
        out = {a - sum(1 for g in gone if g < a): v for a, v in data.items()}
        if op in ("Split", "TopK"):
            return [out] * len(node.output) if op == "Split" else [out, out]
        return [out] + [{}] * (len(node.output) - 1)

    def global_pool(self, node, data) -> Geo:
        if not self.keep_global:
            self.refuse(node, "pools over all positions (as squeeze-excitation blocks do)",
                        "--keep-global-pools keeps such pools global over the whole input")
        self.out.kept_global.append(node_label(node))
        return {}

    def transpose(self, node, ins) -> list:
        perm = list(attr(node, "perm", []) or reversed(range(self.rank(node.input[0]))))
        return [{i: ins[0][p] for i, p in enumerate(perm) if p in ins[0]}]

    def squeeze(self, node, ins) -> list:
        src, rank = ins[0], self.rank(node.input[0])
        axes = attr(node, "axes", None)
        if axes is None:
            axes = ops.axes_input(node, 1, self.idx.value)
        if axes is None or (node.op_type == "Squeeze" and not axes):
            self.refuse(node, "changes the rank by axes that are not known statically")
        if node.op_type == "Squeeze":
            gone = ops.norm_axes(axes, rank)
            if gone & set(src):
                self.refuse(node, "removes a spatial axis")
            return [{a - sum(1 for g in gone if g < a): v for a, v in src.items()}]
        new = ops.norm_axes(axes, rank + len(axes))
        out, j = {}, 0
        for i in range(rank + len(axes)):
            if i in new:
                continue
            if j in src:
                out[i] = src[j]
            j += 1
        return [out]

    def select(self, node, ins) -> list:
        """Slice/Gather along non-spatial axes (a channel split) keep positions."""
        src = ins[0]
        if any(ins[1:]):
            self.refuse(node, "selects by indices computed from the map")
        rank = self.rank(node.input[0])
        if node.op_type == "Gather":
            axes = [int(attr(node, "axis", 0))]
            ind = self.idx.value(node.input[1])
            if ind is None or ind.ndim != 1:
                self.refuse(node, "gathers with indices that change the rank")
        else:
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 3 and node.input[3]:
                v = self.idx.value(node.input[3])
                axes = None if v is None else [int(a) for a in v.reshape(-1)]
            if axes is None:
                starts = attr(node, "starts", None)
                if starts is None and len(node.input) > 1:
                    v = self.idx.value(node.input[1])
                    starts = None if v is None else list(v.reshape(-1))
                axes = list(range(len(starts))) if starts is not None else None
        if axes is None or not rank or any(a % rank in src for a in axes):
            self.refuse(node, "slices along a spatial axis")
        return [dict(src)]

    def reshape(self, node, ins) -> list:
        """A Reshape that keeps the spatial axes last and untouched (a channel
        shuffle's [N,C,H,W] -> [N,g,C/g,H,W]) maps them through; anything
        else mixes positions."""
        src = ins[0]
        ishape, oshape = self.shape(node.input[0]), self.shape(node.output[0])
        spatial = sorted(src)
        if ishape is None or oshape is None or len(node.input) < 2:
            self.refuse(node, "reshapes spatial axes")
        r_in, r_out, s = len(ishape), len(oshape), len(spatial)
        target = self.idx.value(node.input[1])
        # The spatial axes stay last with their sizes (where inference knows the
        # input's); the batch entry is replaced by Shape(x)[0] when rewritten.
        ok = (spatial == list(range(r_in - s, r_in)) and r_out > s
              and all(isinstance(d, int) for d in oshape[1:])
              and all(not isinstance(a, int) or a == b for a, b in zip(ishape[r_in - s:], oshape[r_out - s:]))
              and target is not None and target.ndim == 1 and len(target) == r_out
              and [int(d) for d in target[r_out - s:]] == [int(d) for d in oshape[r_out - s:]])
        if not ok:
            self.refuse(node, "reshapes spatial axes")
        self.out.reshapes.append((node, s, [int(d) for d in oshape[1:r_out - s]]))
        return [{r_out - s + j: src[spatial[j]] for j in range(s)}]

    def windowed(self, node, src) -> Geo:
        ishape = self.shape(node.input[0])
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = node.input[3 if node.op_type == "QLinearConv" else 1]
            wshape = self.shape(w) or self.idx.const_shape(w)
            kernel = attr(node, "kernel_shape", None) or (list(wshape[2:]) if wshape else None)
        else:
            kernel = attr(node, "kernel_shape", None)
        if kernel is None:
            self.refuse(node, "has no known kernel shape")
        if 1 in src and self.wanted is not None:  # (pass 1 still counts an input's channel axis)
            self.refuse(node, "reads a spatial axis as its channels")
        n = len(kernel)
        strides = attr(node, "strides", None) or [1] * n
        dilations = attr(node, "dilations", None) or [1] * n
        pads = attr(node, "pads", None) or [0] * (2 * n)
        auto = attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        out: Geo = {}
        for i in range(n):
            axis = i + 2
            if axis not in src:
                continue
            k, s, d = int(kernel[i]), int(strides[i]), int(dilations[i])
            p = int(pads[i])
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                size = ishape[axis] if ishape else None
                if not isinstance(size, int):
                    self.refuse(node, f"pads by auto_pad={auto} on an unknown size")
                total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
                p = total // 2 if auto == "SAME_UPPER" else total - total // 2
            elif auto == "VALID":
                p = 0
            out[axis] = compose([(k, s, p, d)], src[axis])
        return out

    def pad(self, node, ins) -> list:
        src = ins[0]
        pads = attr(node, "pads", None)
        if pads is None and len(node.input) > 1:
            v = self.idx.value(node.input[1])
            pads = None if v is None else [int(x) for x in v.reshape(-1)]
        if pads is None or (len(node.input) > 3 and node.input[3]):
            self.refuse(node, "has pads that are not known statically")
        rank = len(pads) // 2
        out = {}
        for axis, a in src.items():
            p = pads[axis] if axis < rank else 0
            out[axis] = Axis(a.input, a.input_axis, a.stride, a.receptive_field, a.offset - p * a.stride,
                             a.padded or p > 0)
        return [out]
