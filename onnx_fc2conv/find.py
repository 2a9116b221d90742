"""Find FC heads: match the collapse of a spatial feature map and the chain of
FC layers and position-wise ops after it. Matching never mutates the graph;
an FC that cannot be converted becomes a :class:`Layer` with its reason.

Every exporter variant normalises into one :class:`Head`:

- the collapse: ``F [N, C, *S]`` -> optional ``Transpose(perm)`` -> any chain
  of Flatten / Reshape / Squeeze / Unsqueeze / Identity / Dropout that ends in
  ``[N, C*prod(S)]``. Those ops keep row-major order, so the whole collapse is
  ``flatten(transpose(F, perm))``; whether it keeps the batch axis is decided
  by evaluating the shapes it computes (a Reshape's shape may be a constant or
  an expression of ``Shape(F)``) for concrete batch sizes, not by the node list;
- a global reduction with ``keepdims=0`` (``[N, C]``) counts as a map with
  all-ones spatial dims;
- FCs: ``Gemm`` (transA = 0), or ``MatMul`` with a constant 2-D weight plus an
  optional ``Add`` of a constant bias;
- between and after them: position-wise ops, which keep their meaning on the
  ``[N, M, 1, ...]`` Conv layout once their constants are reshaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from . import kernels
from .errors import Fc2ConvError
from .graph import FOLDABLE, GraphIndex, attr, node_label, run_nodes
from .shapes import TensorInfo

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Gelu", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Erf", "Identity", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Cast", "Clip",
    "Dropout", "BatchNormalization", "PRelu", "IsNaN", "IsInf",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
RESHAPE_LIKE = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"})


@dataclass(frozen=True)
class FC:
    """One FC layer, normalised: ``Y = alpha * A @ B' + beta * C``."""
    name: str
    op: str                      # "Gemm", "MatMul", "MatMul+Add"
    nodes: tuple                 # the nodes it replaces
    input: str
    output: str
    weight: str                  # tensor name of B
    trans_b: bool
    alpha: float
    beta: float
    bias: str | None             # tensor name of C or of the Add's constant
    m: int
    k: int


@dataclass(frozen=True)
class Step:
    """A position-wise op carried over into the Conv layout."""
    node: onnx.NodeProto
    data_index: int              # which input is the chain tensor
    constants: tuple             # ((input index, value reshaped for [N, M, 1...]), ...)
    identity: bool = False       # a reshape that is a no-op on [N, M]: dropped


@dataclass(frozen=True)
class Collapse:
    source: str                  # F
    perm: tuple                  # transpose applied before flattening
    feature_shape: tuple         # (C, *S) in F's own axis order
    nodes: tuple
    pattern: str
    layout: str
    unsqueeze: int = 0           # F is [N, C] from a keepdims=0 reduction over this many axes


@dataclass(frozen=True)
class Head:
    collapse: Collapse
    items: tuple                 # FC and Step, in graph order
    end: str                     # the original tensor the final Flatten writes

    @property
    def fcs(self) -> tuple:
        return tuple(i for i in self.items if isinstance(i, FC))

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

    @property
    def becomes(self) -> str:
        if not self.converted:
            return "not converted: " + (self.reason or "")
        k = "x".join(str(d) for d in self.kernel)
        return f"Conv {k}, {self.in_channels} -> {self.out_channels} channels"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "op", "pattern", "input_shape", "layout", "converted",
                                            "reason", "kernel", "in_channels", "out_channels", "head")}
        d["becomes"] = self.becomes
        return d


def _fmt_shape(shape) -> list:
    return ["?" if d is None else d for d in (shape or ())]


class _Matcher:
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, TensorInfo]):
        self.idx = GraphIndex(model)
        self.shapes = shapes

    def shape(self, name: str):
        info = self.shapes.get(name)
        return None if info is None else info.shape

    # -- FC layers -----------------------------------------------------------
    def match_fc(self, node: onnx.NodeProto) -> FC | str | None:
        """An FC, a reason it is an FC we will not convert, or None (not an FC)."""
        fc = self._match_fc(node)
        if isinstance(fc, FC):
            elem = self.idx.elem_type(fc.weight)
            if elem not in conv_types(self.idx.opset):
                name = onnx.helper.tensor_dtype_to_string(elem).replace("TensorProto.", "").lower()
                return (f"Conv does not take {name} at opset {self.idx.opset}"
                        + (" (bfloat16 from opset 22)" if elem == onnx.TensorProto.BFLOAT16 else ""))
        return fc

    def _match_fc(self, node: onnx.NodeProto) -> FC | str | None:
        if node.domain not in ("", "ai.onnx"):
            return None
        idx = self.idx
        label = node_label(node)
        if node.op_type == "Gemm":
            a, b = node.input[0], node.input[1]
            c = node.input[2] if len(node.input) > 2 and node.input[2] else None
            wshape = idx.const_shape(b)
            if wshape is None:
                return f"its weight {b!r} is not a constant"
            if len(wshape) != 2:
                return f"its weight {b!r} has rank {len(wshape)}, not 2"
            if attr(node, "transA", 0):
                return "transA=1: the Gemm reads its input transposed, so it is not a convolution over the feature map"
            trans_b = bool(attr(node, "transB", 0))
            m, k = (wshape[0], wshape[1]) if trans_b else (wshape[1], wshape[0])
            alpha = float(attr(node, "alpha", 1.0))
            beta = float(attr(node, "beta", 1.0))
            if c is not None:
                cv = idx.value(c)
                if cv is None:
                    return f"its bias {c!r} is not a constant"
                try:
                    kernels.fc_bias(cv, m, beta=beta)
                except kernels.NotPerFeature as exc:
                    return f"its {exc}"
            return FC(label, "Gemm", (node,), a, node.output[0], b, trans_b, alpha, beta, c, m, k)
        if node.op_type == "MatMul":
            a, b = node.input[0], node.input[1]
            wshape = idx.const_shape(b)
            if wshape is None or idx.const_shape(a) is not None:
                return None  # a product of two activations is not an FC layer
            if len(wshape) != 2:
                return f"its weight {b!r} has rank {len(wshape)}, not 2"
            ashape = self.shape(a)
            if ashape is not None and len(ashape) != 2:
                return (f"its input {a!r} has rank {len(ashape)}: a MatMul over more than a batch of "
                        "feature vectors is not an FC on a flattened map")
            k, m = wshape
            nodes, out, bias = (node,), node.output[0], None
            add = idx.only_consumer(node.output[0])
            if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
                other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                bv = idx.value(other)
                if bv is not None:
                    try:
                        kernels.fc_bias(bv, m)
                        nodes, out, bias = (node, add), add.output[0], other
                    except kernels.NotPerFeature:
                        pass
            op = "MatMul+Add" if bias else "MatMul"
            return FC(label, op, nodes, a, out, b, False, 1.0, 1.0, bias, m, k)
        return None

    # -- collapse of the feature map -----------------------------------------
    def match_collapse(self, a: str) -> Collapse | str:
        idx = self.idx
        walked: list[onnx.NodeProto] = []
        t = a
        while True:
            p = idx.producer.get(t)
            if p is None or p.op_type not in RESHAPE_LIKE or p.domain not in ("", "ai.onnx"):
                break
            if p.op_type == "Dropout" and len(p.output) > 1 and p.output[1] and idx.uses(p.output[1]):
                break
            walked.append(p)
            t = p.input[0]
        src = t
        producer = idx.producer.get(src)
        perm = None
        transpose = None
        if producer is not None and producer.op_type == "Transpose" and walked:
            p = tuple(attr(producer, "perm", ()) or ())
            rank = len(self.shape(producer.input[0]) or ())
            if not p and rank:
                p = tuple(reversed(range(rank)))
            if len(p) >= 3 and p[0] == 0:
                perm, transpose = p, producer
                src = producer.input[0]
                producer = idx.producer.get(src)
        fshape = self.shape(src)
        what = f"{producer.op_type} {node_label(producer)!r}" if producer is not None else f"graph input {src!r}"
        if fshape is None:
            return f"the shape of its input map {src!r} is unknown"
        unsqueeze = 0
        if len(fshape) == 2 and producer is not None and perm is None:
            unsqueeze = self._global_reduce_rank(producer, keepdims=0)
            if not unsqueeze:
                return f"its input comes from {what} of shape {_fmt_shape(fshape)}, not from a flattened spatial feature map"
            fshape = tuple(fshape) + (1,) * unsqueeze
        elif len(fshape) < 3:
            return f"its input comes from {what} of shape {_fmt_shape(fshape)}, not from a flattened spatial feature map"
        if not walked and not unsqueeze:
            return f"its input comes from {what} of shape {_fmt_shape(fshape)} without a flatten"
        rank = len(fshape)
        if perm is None:
            perm = tuple(range(rank))
        if not all(isinstance(d, int) for d in fshape[1:]):
            raise _NeedsShape(src, fshape)
        feature_shape = tuple(int(d) for d in fshape[1:])
        k = int(np.prod(feature_shape))
        reason = self._keeps_batch(fshape, transpose, list(reversed(walked)), k, unsqueeze)
        if reason:
            return reason
        ops = [n.op_type for n in reversed(walked)]
        for i, n in enumerate(reversed(walked)):
            if n.op_type == "Reshape" and len(n.input) > 1 and idx.value(n.input[1]) is None:
                ops[i] = "Reshape(shape chain)"
        if transpose is not None:
            ops.insert(0, "Transpose")
        pool = idx.producer.get(src)
        if pool is not None and (pool.op_type in GLOBAL_POOLS or pool.op_type in REDUCES
                                 or (pool.op_type in ("AveragePool", "MaxPool") and all(d == 1 for d in feature_shape[1:]))):
            keep = "" if pool.op_type not in REDUCES else f"(keepdims={0 if unsqueeze else 1})"
            ops.insert(0, pool.op_type + keep)
        letters = "NC" + {1: "L", 2: "HW", 3: "DHW"}.get(rank - 2, "".join(f"S{i}" for i in range(rank - 2)))
        layout = "".join(letters[i] for i in perm)
        nodes = tuple(([transpose] if transpose is not None else []) + list(reversed(walked)))
        return Collapse(src, perm, feature_shape, nodes, "+".join(ops) or "-", layout, unsqueeze)

    def _global_reduce_rank(self, node: onnx.NodeProto, keepdims: int) -> int:
        return global_reduce_rank(self.idx, self.shapes, node, keepdims)

    def _keeps_batch(self, fshape, transpose, forward, k, unsqueeze) -> str | None:
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
                    shape = self._apply_shape(n, shape, b, batch_sym)
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

    def _apply_shape(self, node, shape, b, batch_sym):
        op = node.op_type
        rank = len(shape)
        if op in ("Identity", "Dropout"):
            return shape
        if op == "Flatten":
            ax = int(attr(node, "axis", 1))
            ax = ax + rank if ax < 0 else ax
            return [int(np.prod(shape[:ax])), int(np.prod(shape[ax:]))]
        if op in ("Squeeze", "Unsqueeze"):
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1]:
                v = self.eval_shape_tensor(node.input[1], b, batch_sym)
                axes = [int(x) for x in v.reshape(-1)]
            if op == "Squeeze":
                if not axes:
                    return [d for d in shape if d != 1]
                axes = {a % rank for a in axes}
                return [d for i, d in enumerate(shape) if i not in axes]
            out_rank = rank + len(axes)
            axes = {a % out_rank for a in axes}
            it = iter(shape)
            return [1 if i in axes else next(it) for i in range(out_rank)]
        if op == "Reshape":
            if len(node.input) > 1 and node.input[1]:
                target = [int(x) for x in self.eval_shape_tensor(node.input[1], b, batch_sym).reshape(-1)]
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

    def eval_shape_tensor(self, name: str, b: int, batch_sym) -> np.ndarray:
        """The value of a shape tensor when the batch is ``b``: a constant, or
        an expression of constants and ``Shape`` of tensors whose only
        non-static dim is the batch."""
        idx = self.idx
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
                shp = self.shape(node.input[0])
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
            if node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx") or len(nodes) > 64:
                raise _Unknown(f"the reshape shape {name!r} is computed by {node.op_type} {node_label(node)!r}")
            nodes.append(node)
            stack.extend(node.input)
        order = sorted(nodes, key=lambda n: idx.position[id(n)])
        try:
            return run_nodes(order, feeds, name, idx.opset)
        except Exception as exc:  # the reference runtime's message is the reason
            raise _Unknown(f"the reshape shape {name!r} could not be evaluated ({str(exc).splitlines()[0]})") from None

    # -- chain after the first FC ------------------------------------------
    def match_step(self, node: onnx.NodeProto, t: str, m: int, spatial_rank: int) -> Step | None:
        idx = self.idx
        if node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        data = list(node.input).index(t)
        live_outputs = [o for o in node.output[1:] if o and idx.uses(o)]
        if live_outputs:
            return None
        if op == "Identity" and data == 0:  # a no-op whatever inference knows of its shapes
            return Step(node, 0, (), identity=True)
        if op in RESHAPE_LIKE and op != "Dropout":
            ishape, oshape = self.shape(t), self.shape(node.output[0])
            if data == 0 and ishape is not None and oshape is not None and len(ishape) == 2 \
                    and len(oshape) == 2 and oshape[1] == m and (oshape[0] == ishape[0]):
                return Step(node, 0, (), identity=True)
            return None
        if op in UNARY:
            if data != 0:
                return None
            consts = []
            if op == "BatchNormalization":
                if int(attr(node, "training_mode", 0)):
                    return None
                return Step(node, 0, ())
            if op == "PRelu":
                slope = idx.value(node.input[1])
                if slope is None:
                    return None
                try:
                    consts.append((1, kernels.per_feature(slope, m, spatial_rank)))
                except kernels.NotPerFeature:
                    return None
            if op not in ("PRelu", "Clip", "Dropout") and any(inp and idx.value(inp) is None for inp in node.input[1:]):
                return None
            if op == "Clip" and any(inp and self._rank(inp) not in (0, None) for inp in node.input[1:]):
                return None
            return Step(node, 0, tuple(consts))
        if op in BINARY and len(node.input) == 2:
            other = 1 - data
            v = idx.value(node.input[other])
            if v is None:
                return None
            try:
                return Step(node, data, ((other, kernels.per_feature(v, m, spatial_rank)),))
            except kernels.NotPerFeature:
                return None
        return None

    def _rank(self, name):
        s = self.shape(name)
        return None if s is None else len(s)


def global_reduce_rank(idx: GraphIndex, shapes: dict, node: onnx.NodeProto, keepdims: int | None = None) -> int:
    """The spatial rank a reduction removes when it reduces every spatial axis
    of a ``[N, C, *S]`` map (with ``keepdims`` as given, or either); else 0."""
    if node.op_type not in REDUCES or node.domain not in ("", "ai.onnx"):
        return 0
    info = shapes.get(node.input[0])
    ishape = None if info is None else info.shape
    if ishape is None or len(ishape) < 3:
        return 0
    if keepdims is not None and int(attr(node, "keepdims", 1)) != keepdims:
        return 0
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = idx.value(node.input[1])
        if v is None:
            return 0
        axes = [int(x) for x in v.reshape(-1)]
    rank = len(ishape)
    if not axes or sorted(a % rank for a in axes) != list(range(2, rank)):
        return 0
    return rank - 2


def conv_types(opset: int) -> set[int]:
    """The element types Conv (and the pools) accept at an opset."""
    types = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    return types | {onnx.TensorProto.BFLOAT16} if opset >= 22 else types


class _Unknown(Exception):
    pass


class _NeedsShape(Exception):
    def __init__(self, tensor, shape):
        super().__init__(tensor)
        self.tensor, self.shape = tensor, shape


class NeedsInputShape(Fc2ConvError):
    """The first FC's map has symbolic spatial dims: the native input size
    must be given (or derived from the FC's K, see api.convert)."""

    def __init__(self, message: str, fc_name: str, k: int, tensor: str):
        super().__init__(message)
        self.fc_name, self.k, self.tensor = fc_name, k, tensor


def find_heads(model: onnx.ModelProto, shapes: dict[str, TensorInfo]) -> tuple[list[Head], list[Layer]]:
    """Every FC layer of the model: heads to convert, and a record per FC."""
    mt = _Matcher(model, shapes)
    idx = mt.idx
    heads: list[Head] = []
    layers: list[Layer] = []
    claimed: set[int] = set()
    for node in model.graph.node:
        if id(node) in claimed:
            continue
        fc = mt.match_fc(node)
        if fc is None:
            continue
        if isinstance(fc, str):
            layers.append(Layer(node_label(node), node.op_type, input_shape=_fmt_shape(mt.shape(node.input[0])),
                                reason=fc))
            continue
        try:
            col = mt.match_collapse(fc.input)
        except _NeedsShape as exc:
            raise NeedsInputShape(_needs_shape_message(model, fc, exc), fc.name, fc.k, exc.tensor) from None
        if isinstance(col, str):
            layers.append(Layer(fc.name, fc.op, input_shape=_fmt_shape(mt.shape(fc.input)), reason=col))
            continue
        k = int(np.prod(col.feature_shape))
        if fc.k != k:
            raise Fc2ConvError(
                f"FC {fc.name!r} has weight K={fc.k}, but the feature map {col.source!r} it consumes has "
                f"C*prod(spatial) = {'*'.join(map(str, col.feature_shape))} = {k}: the model is inconsistent")
        spatial = len(col.feature_shape) - 1
        items: list = [fc]
        head_no = len(heads)
        layers.append(Layer(fc.name, fc.op, col.pattern, _fmt_shape(mt.shape(col.source)) if not col.unsqueeze
                            else _fmt_shape(mt.shape(col.source)) + [1] * col.unsqueeze, col.layout, True, None,
                            list(col.feature_shape[1:]), col.feature_shape[0], fc.m, head_no))
        t, m = fc.output, fc.m
        while True:
            nxt = idx.only_consumer(t)
            if nxt is None or t in idx.outputs:
                break
            nfc = mt.match_fc(nxt)
            if isinstance(nfc, FC) and nfc.input == t:
                if nfc.k != m:
                    raise Fc2ConvError(f"FC {nfc.name!r} has weight K={nfc.k}, but its input {t!r} has {m} features: "
                                       "the model is inconsistent")
                layers.append(Layer(nfc.name, nfc.op, "chain", [_fmt_shape(mt.shape(t))[0] if mt.shape(t) else "?", m],
                                    "-", True, None, [1] * spatial, m, nfc.m, head_no))
                items.append(nfc)
                t, m = nfc.output, nfc.m
                continue
            if isinstance(nfc, FC) or isinstance(nfc, str):
                break
            step = mt.match_step(nxt, t, m, spatial)
            if step is None:
                break
            items.append(step)
            t = nxt.output[0]
        for it in items:
            for n in (it.nodes if isinstance(it, FC) else (it.node,)):
                claimed.add(id(n))
        heads.append(Head(col, tuple(items), t))
    return heads, layers


def _needs_shape_message(model, fc: FC, exc: _NeedsShape) -> str:
    from .shapes import input_infos
    hints = []
    for name, info in input_infos(model).items():
        if info.shape is not None and not all(isinstance(d, int) for d in info.shape[1:]):
            dims = ["1" if i == 0 and not isinstance(d, int) else (str(d) if isinstance(d, int) else f"<{d or 'size'}>")
                    for i, d in enumerate(info.shape)]
            hints.append(f"--input-shape {name}={','.join(dims)}")
    hint = (" give the native input size, e.g. " + " ".join(hints)) if hints else " give the native input size with --input-shape"
    return (f"FC {fc.name!r} consumes {exc.tensor!r} of shape {_fmt_shape(exc.shape)} whose spatial size depends on "
            f"symbolic input dims;{hint}")
