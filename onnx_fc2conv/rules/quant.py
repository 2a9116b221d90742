"""Quantized FC layers: match them, and write their Conv form with the
integer weight kept as an integer initializer.

A quantized FC computes the float FC ``Y = A @ W'`` on dequantized values,
``W' = (Wq - zw) * sw`` (per tensor, or per output feature ``m``). The Conv
kernel is the same integer matrix rearranged exactly as for float
(kernels.py: ``Wq`` as ``[M, K]`` -> ``[M, C, *S]`` in the collapse's order;
integers are moved, never recomputed), and the per-output-feature scales and
zero points carry over unchanged: on ``[M, K]`` they lie along axis 0, and
so they do on the kernel. The formats (what onnxruntime.quantization writes):

- **QDQ**: ``Gemm``/``MatMul`` whose weight is ``DequantizeLinear(Wq, sw,
  zw[, axis])``  ->  ``DequantizeLinear(kernel, sw, zw, axis=0) -> Conv``.
  The activation ``QuantizeLinear -> DequantizeLinear`` pair in front of the
  FC (per tensor: it acts on each element alone) is part of the FC and is
  re-emitted on the map; a bias ``DequantizeLinear(int32 [M])`` stays the
  Conv's bias; a MatMul's bias Add behind its own output Q/DQ pair is
  re-emitted behind them with the integer bias reshaped to ``[M, 1, ...]``.
- **QOperator**: ``QLinearMatMul`` (+ a com.microsoft ``QLinearAdd`` of a
  constant) and com.microsoft ``QGemm`` -> ``QLinearConv`` with the same
  scales and zero points (the QLinearAdd follows on the map with its
  constant reshaped). QGemm's int32 bias is QLinearConv's bias (both are
  quantized with scale ``sx * sw`` and zero point 0).
- **dynamic**: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(sx *
  sw) [-> Add(bias)]`` -> the same with ``ConvInteger``; the
  DynamicQuantizeLinear moves onto the map, where it sees the same elements
  (its scale is over the whole tensor, so it is the same), and per-feature
  constants become ``[M, 1, ...]``. Keep mode only: dense.analyse refuses it
  (one decision, which inspect and convert share).

A weight quantized along the input features, in blocks, or in a type the
rewrite cannot carry is refused with the reason: never dequantized.

Matching: a quantized FC whose input comes through its own activation
quantizer (QuantizeLinear -> DequantizeLinear, or DynamicQuantizeLinear) is
matched from that quantizer, so that the chain of FCs (find.py) reaches it
from the previous FC's output and the collapse sees the float tensor before
it; the FC op itself then answers ``False`` ("matched from another node").
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import kernels, ops
from ..graph import attr, node_label
from . import FC, Context, Dequant, Quant, Refusal

# integer types whose weights and biases are carried as they are
INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
                 onnx.TensorProto.INT32}


def per_tensor(ctx: Context, node: onnx.NodeProto) -> bool:
    """A QuantizeLinear/DequantizeLinear with constant scalar scale and zero
    point, no blocks: it acts on each element alone, on any layout."""
    if len(node.input) < 2 or int(attr(node, "block_size", 0) or 0):
        return False
    for name in node.input[1:3]:
        if name:
            v = ctx.idx.value(name)
            if v is None or v.ndim != 0:
                return False
    return True


def _only(ctx: Context, name: str, op: str) -> onnx.NodeProto | None:
    n = ctx.idx.only_consumer(name)
    return n if n is not None and ops.is_quant_op(n, op) else None


def dequant(ctx: Context, name: str) -> Dequant | Refusal | None:
    """``name`` as a DequantizeLinear of a constant integer tensor, a Refusal
    when it is one the rewrite cannot carry, or None when it is not one."""
    idx = ctx.idx
    node = idx.producer.get(name)
    if node is None or not ops.is_quant_op(node, "DequantizeLinear"):
        return None
    q = node.input[0]
    shape = idx.const_shape(q)
    if shape is None:
        return None
    what = f"{node_label(node)!r}"
    elem = idx.elem_type(q)
    if elem not in INTEGER_TYPES:
        tname = helper.tensor_dtype_to_string(elem).replace("TensorProto.", "").lower()
        return Refusal(f"its DequantizeLinear {what} reads {tname}, which the rewrite does not carry "
                       "(8-, 16- and 32-bit integers only)", node)
    if int(attr(node, "block_size", 0) or 0):
        return Refusal(f"its DequantizeLinear {what} is blocked (block_size "
                       f"{attr(node, 'block_size')}): a Conv kernel cannot keep blocks along the input features",
                       node)
    scale = idx.value(node.input[1]) if len(node.input) > 1 else None
    zp = idx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
        return Refusal(f"the scale or zero point of its DequantizeLinear {what} is not a constant", node)
    axis = None
    if scale.ndim:
        axis = int(attr(node, "axis", 1)) % max(len(shape), 1)
    return Dequant(node, q, tuple(shape), axis, helper.np_dtype_to_tensor_dtype(scale.dtype))


def _pair_before(ctx: Context, name: str):
    """The per-tensor ``QuantizeLinear -> DequantizeLinear`` pair that writes
    ``name`` for it alone, or None."""
    idx = ctx.idx
    dq = idx.producer.get(name)
    if dq is None or not ops.is_quant_op(dq, "DequantizeLinear") or idx.uses(name) != 1:
        return None
    q = idx.producer.get(dq.input[0])
    if q is None or not ops.is_quant_op(q, "QuantizeLinear") or idx.uses(dq.input[0]) != 1:
        return None
    if not (per_tensor(ctx, q) and per_tensor(ctx, dq)) or any(o and idx.uses(o) for o in q.output[1:]):
        return None
    return q, dq


def _pair_after(ctx: Context, name: str):
    """The per-tensor ``QuantizeLinear -> DequantizeLinear`` pair that reads
    ``name`` alone, or None."""
    q = _only(ctx, name, "QuantizeLinear")
    if q is None:
        return None
    dq = _only(ctx, q.output[0], "DequantizeLinear")
    if dq is None or not (per_tensor(ctx, q) and per_tensor(ctx, dq)):
        return None
    return q, dq


# -- QDQ ---------------------------------------------------------------------

def match_qdq(node: onnx.NodeProto, ctx: Context):
    """A Gemm/MatMul with a DequantizeLinear'd integer weight (from the
    QuantizeLinear of its input pair, if it has one)."""
    if ops.is_quant_op(node, "QuantizeLinear"):
        dq = _only(ctx, node.output[0], "DequantizeLinear")
        op = ctx.idx.only_consumer(dq.output[0]) if dq is not None else None
        if op is None or op.op_type not in ("Gemm", "MatMul") or not ops.is_default(op) \
                or op.input[0] != dq.output[0] or _pair_before(ctx, op.input[0]) != (node, dq):
            return None
        found = _qdq(op, ctx, (node, dq))
        return found if not isinstance(found, Refusal) else None  # the op itself reports it
    if node.op_type not in ("Gemm", "MatMul"):
        return None
    if len(node.input) < 2 or dequant(ctx, node.input[1]) is None:
        return None
    pair = _pair_before(ctx, node.input[0])
    found = _qdq(node, ctx, pair or ())
    if pair and not isinstance(found, Refusal):
        return False  # matched from its input's QuantizeLinear
    return found


def _weight(ctx: Context, node: onnx.NodeProto, name: str, trans_b: bool):
    """The weight's Dequant, checked: 2-D, per tensor or per output feature."""
    w = dequant(ctx, name)
    if isinstance(w, Refusal) or w is None:
        return w or Refusal(f"its weight {name!r} is not a constant", node)
    if len(w.shape) != 2:
        return Refusal(f"its weight {name!r} has rank {len(w.shape)}, not 2", node)
    m_axis = 0 if trans_b else 1
    if w.axis is not None and w.axis != m_axis:
        return Refusal(f"its weight is quantized along the input features (axis {w.axis} of {list(w.shape)}): "
                       "a Conv kernel keeps scales per output channel only", node)
    return w


def _bias_ok(ctx: Context, node, name: str, m: int) -> Refusal | None:
    """None when ``name`` is a per-feature bias: a constant, or a
    DequantizeLinear'd integer constant with scales per tensor or per feature."""
    b = dequant(ctx, name)
    if isinstance(b, Refusal):
        return b
    if b is not None:
        flat = int(np.prod(b.shape)) if b.shape else 1
        if (len(b.shape) > 2 or (len(b.shape) == 2 and b.shape[0] != 1) or flat not in (1, m)
                or (b.axis is not None and b.shape[b.axis] != m)):
            return Refusal(f"its bias {name!r} of shape {list(b.shape)} is not per feature", node)
        return None
    v = ctx.idx.value(name)
    if v is None:
        return Refusal(f"its bias {name!r} is not a constant", node)
    try:
        kernels.fc_bias(v, m)
    except kernels.NotPerFeature as exc:
        return Refusal(f"its {exc}", node)
    return None


def _qdq(node: onnx.NodeProto, ctx: Context, pre: tuple):
    gemm = node.op_type == "Gemm"
    if gemm and attr(node, "transA", 0):
        return Refusal("transA=1: the Gemm reads its input transposed", node)
    trans_b = bool(attr(node, "transB", 0)) if gemm else False
    w = _weight(ctx, node, node.input[1], trans_b)
    if isinstance(w, Refusal):
        return w
    m, k = (w.shape[0], w.shape[1]) if trans_b else (w.shape[1], w.shape[0])
    a = pre[0].input[0] if pre else node.input[0]
    if not gemm:
        rank = ctx.rank(node.input[0])
        if rank is not None and rank != 2:
            return Refusal(f"its input has rank {rank}: a MatMul over more than a batch of feature vectors is not "
                           "an FC on a flattened map", node)
    alpha = float(attr(node, "alpha", 1.0)) if gemm else 1.0
    if alpha != 1.0:
        return Refusal(f"alpha={alpha:g} would scale the dequantized weight: not an integer kernel", node)
    nodes, out, bias, post, consts = pre + (node,), node.output[0], None, (), ()
    op = "QDQ Gemm" if gemm else "QDQ MatMul"
    if gemm and len(node.input) > 2 and node.input[2]:
        if float(attr(node, "beta", 1.0)) != 1.0:
            return Refusal(f"beta={attr(node, 'beta'):g} would scale the dequantized bias", node)
        refusal = _bias_ok(ctx, node, node.input[2], m)
        if refusal is not None:
            return refusal
        bias = node.input[2]
    elif not gemm:
        add = _only_add(ctx, out)
        if add is not None and _bias_ok(ctx, add, _other(add, out), m) is None:
            nodes, out, bias, op = nodes + (add,), add.output[0], _other(add, out), "QDQ MatMul+Add"
        else:
            pair = _pair_after(ctx, out)
            add = _only_add(ctx, pair[1].output[0]) if pair else None
            if add is not None and _bias_ok(ctx, add, _other(add, pair[1].output[0]), m) is None:
                post = pair + (add,)
                nodes, out, op = nodes + post, add.output[0], "QDQ MatMul+Q/DQ+Add"
                consts = ((2, list(add.input).index(_other(add, pair[1].output[0]))),)
    quant = Quant("qdq", pre, w, bias, post, consts, float_type=w.float_type)
    return FC(name=node_label(node), op=op, nodes=nodes, input=a, output=out, weight=w.q, trans_b=trans_b,
               alpha=1.0, beta=1.0, bias=bias, m=m, k=k, quant=quant)


def _only_add(ctx: Context, name: str) -> onnx.NodeProto | None:
    add = ctx.idx.only_consumer(name)
    if add is None or add.op_type != "Add" or not ops.is_default(add) or name in ctx.idx.outputs:
        return None
    return add


def _other(node: onnx.NodeProto, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


# -- QOperator ----------------------------------------------------------------

def match_qlinear_matmul(node: onnx.NodeProto, ctx: Context):
    if not ops.is_quant_op(node, "QLinearMatMul") or node.domain == ops.MS_DOMAIN:
        return None
    idx = ctx.idx
    if len(node.input) < 8:
        return None
    wshape = idx.const_shape(node.input[3])
    if wshape is None or idx.const_shape(node.input[0]) is not None:
        return None
    if len(wshape) != 2:
        return Refusal(f"its weight {node.input[3]!r} has rank {len(wshape)}, not 2", node)
    rank = ctx.rank(node.input[0])
    if rank is not None and rank != 2:
        return Refusal(f"its input has rank {rank}: not an FC on a flattened map", node)
    k, m = wshape
    refusal = _qop_scales(ctx, node, [1, 2, 6, 7], [4, 5], m)
    if refusal:
        return refusal
    nodes, out, post, consts, op = (node,), node.output[0], (), (), "QLinearMatMul"
    add = idx.only_consumer(out)
    if add is not None and ops.is_quant_op(add, "QLinearAdd") and len(add.input) >= 8 and out not in idx.outputs:
        data = 0 if add.input[0] == out else 3
        other = 3 - data
        v = idx.value(add.input[other])
        if add.input[data] == out and v is not None and _scalars(ctx, add, [1, 2, 4, 5, 6, 7]):
            try:
                kernels.per_feature(v, m, 1)
                post, consts = (add,), ((0, other),)
                nodes, out, op = nodes + post, add.output[0], "QLinearMatMul+QLinearAdd"
            except kernels.NotPerFeature:
                pass
    quant = Quant("qlinear", (), None, None, post, consts, tuple(node.input[i] for i in (1, 2, 4, 5, 6, 7)))
    return FC(name=node_label(node), op=op, nodes=nodes, input=node.input[0], output=out, weight=node.input[3],
               trans_b=False, alpha=1.0, beta=1.0, bias=None, m=m, k=k, quant=quant)


def match_qgemm(node: onnx.NodeProto, ctx: Context):
    if node.op_type != "QGemm" or node.domain != ops.MS_DOMAIN:
        return None
    idx = ctx.idx
    wshape = idx.const_shape(node.input[3]) if len(node.input) > 3 else None
    if wshape is None or idx.const_shape(node.input[0]) is not None:
        return None
    if len(wshape) != 2:
        return Refusal(f"its weight {node.input[3]!r} has rank {len(wshape)}, not 2", node)
    if attr(node, "transA", 0):
        return Refusal("transA=1: the QGemm reads its input transposed", node)
    trans_b = bool(attr(node, "transB", 0))
    m, k = (wshape[0], wshape[1]) if trans_b else (wshape[1], wshape[0])
    if len(node.input) < 9 or not node.input[7] or not node.input[8]:
        return Refusal("it has no output scale and zero point (a float output): QLinearConv always requantizes, "
                       "so the scales do not allow a QLinearConv", node)
    if not node.input[2] or not node.input[5]:
        return Refusal("its input or weight zero point is missing, which QLinearConv requires", node)
    if float(attr(node, "alpha", 1.0)) != 1.0:
        return Refusal(f"alpha={attr(node, 'alpha'):g}: QLinearConv has no alpha, and folding it into the weight "
                       "scale would rescale the int32 bias", node)
    refusal = _qop_scales(ctx, node, [1, 2, 7, 8], [4, 5], m)
    if refusal:
        return refusal
    bias = node.input[6] if len(node.input) > 6 and node.input[6] else None
    if bias is not None:
        v = idx.value(bias)
        if v is None or v.dtype != np.int32:
            return Refusal(f"its bias {bias!r} is not a constant int32", node)
        try:
            kernels.fc_bias(v, m)
        except kernels.NotPerFeature as exc:
            return Refusal(f"its {exc}", node)
    quant = Quant("qgemm", (), None, bias, (), (), tuple(node.input[i] for i in (1, 2, 4, 5, 7, 8)))
    return FC(name=node_label(node), op="QGemm", nodes=(node,), input=node.input[0], output=node.output[0],
               weight=node.input[3], trans_b=trans_b, alpha=1.0, beta=1.0, bias=bias, m=m, k=k, quant=quant)


def _scalars(ctx: Context, node, indices) -> bool:
    for i in indices:
        if i < len(node.input) and node.input[i]:
            v = ctx.idx.value(node.input[i])
            if v is None or v.size != 1:
                return False
    return True


def _qop_scales(ctx: Context, node, act: list, weight: list, m: int) -> Refusal | None:
    """QLinearConv takes scalar activation scales and zero points, and weight
    scales and zero points per tensor or per output channel."""
    idx = ctx.idx
    for i in act:
        if i < len(node.input) and node.input[i]:
            v = idx.value(node.input[i])
            if v is None or v.size != 1:
                return Refusal(f"its activation scale or zero point {node.input[i]!r} is not a constant scalar: "
                               "the scales do not allow a QLinearConv", node)
    for i in weight:
        if i < len(node.input) and node.input[i]:
            v = idx.value(node.input[i])
            if v is None or v.ndim > 1 or v.size not in (1, m):
                return Refusal(f"its weight scale or zero point {node.input[i]!r} is not per tensor or per output "
                               "feature: the scales do not allow a QLinearConv", node)
    return None


# -- dynamic (MatMulInteger) ---------------------------------------------------

def match_matmul_integer(node: onnx.NodeProto, ctx: Context):
    """``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(sx * sw) [-> Add]``,
    matched from the DynamicQuantizeLinear."""
    if ops.is_quant_op(node, "DynamicQuantizeLinear"):
        op = ctx.idx.only_consumer(node.output[0])
        if op is None or not ops.is_quant_op(op, "MatMulInteger"):
            return None
        found = _integer(op, ctx)
        return found if not isinstance(found, Refusal) else None
    if not ops.is_quant_op(node, "MatMulInteger"):
        return None
    if len(node.input) < 2 or ctx.idx.const_shape(node.input[1]) is None:
        return None
    found = _integer(node, ctx)
    return False if not isinstance(found, Refusal) else found


def _integer(node: onnx.NodeProto, ctx: Context):
    idx = ctx.idx
    wshape = idx.const_shape(node.input[1])
    if wshape is None or len(wshape) != 2:
        return Refusal(f"its weight {node.input[1]!r} is not a constant matrix", node)
    k, m = wshape
    dql = idx.producer.get(node.input[0])
    if dql is None or not ops.is_quant_op(dql, "DynamicQuantizeLinear") or len(node.input) < 3 \
            or node.input[2] != dql.output[2] or idx.uses(dql.output[0]) != 1 or idx.uses(dql.output[2]) != 1:
        return Refusal("its input is not quantized by a DynamicQuantizeLinear of its own", node)
    rank = ctx.rank(dql.input[0])
    if rank is not None and rank != 2:
        return Refusal(f"its input has rank {rank}: not an FC on a flattened map", node)
    if len(node.input) > 3 and node.input[3]:
        zw = idx.value(node.input[3])
        if zw is None or zw.ndim > 1 or zw.size not in (1, m):
            return Refusal(f"its weight zero point {node.input[3]!r} is not per tensor or per output feature", node)
        if zw.size > 1 and np.any(zw != zw.reshape(-1)[0]):
            return Refusal("its weight zero points differ per output feature: ConvInteger (onnxruntime) takes one "
                           "weight zero point", node)
    cast = _only(ctx, node.output[0], "Cast")
    if cast is None:
        return Refusal("its int32 output is not dequantized by Cast -> Mul(scale)", node)
    mul = idx.only_consumer(cast.output[0])
    if mul is None or mul.op_type != "Mul" or not ops.is_default(mul):
        return Refusal("its int32 output is not dequantized by Cast -> Mul(scale)", node)
    scale = _other(mul, cast.output[0])
    smul = idx.producer.get(scale)
    if (smul is None or smul.op_type != "Mul" or dql.output[1] not in smul.input or idx.uses(scale) != 1
            or idx.uses(dql.output[1]) != 1):
        return Refusal("its output scale is not the product of its input's scale and a constant weight scale", node)
    sw_name = _other(smul, dql.output[1])
    sw = idx.value(sw_name)
    if sw is None or sw.ndim > 1 or sw.size not in (1, m):
        return Refusal(f"its weight scale {sw_name!r} is not a constant per tensor or per output feature", node)
    post = (cast, smul, mul)
    consts = ((1, list(smul.input).index(sw_name)),)
    out, op = mul.output[0], "MatMulInteger"
    add = _only_add(ctx, out)
    if add is not None:
        bv = idx.value(_other(add, out))
        if bv is not None:
            try:
                kernels.per_feature(bv, m, 1)
                consts += ((3, list(add.input).index(_other(add, out))),)
                post, out, op = post + (add,), add.output[0], "MatMulInteger+Add"
            except kernels.NotPerFeature:
                pass
    quant = Quant("integer", (dql,), None, None, post, consts)
    return FC(name=node_label(node), op=op, nodes=(dql, node) + post, input=dql.input[0], output=out,
               weight=node.input[1], trans_b=False, alpha=1.0, beta=1.0, bias=None, m=m, k=k, quant=quant)


# -- emission ----------------------------------------------------------------

def emit(fc, x: str, out: str, idx, namer, kernel_cache: dict, fshape: tuple, perm,
         strides=None) -> tuple[list, list]:
    """The quantized FC ``fc`` on the map ``x`` (``[N, C, *S]``), writing
    ``out``: (nodes, initializers). The integer kernel is computed once per
    weight and layout (``kernel_cache``)."""
    q = fc.quant
    spatial = len(fshape) - 1
    nodes: list = []
    inits: list = []
    for node in q.pre:
        new = _copy(node, namer, {node.input[0]: x})
        nodes.append(new)
        x = new.output[0]
    key = ("quant", fc.weight, fc.trans_b, perm, tuple(fshape))
    if key not in kernel_cache:
        w = idx.value(fc.weight)
        kernel_cache[key] = namer(f"{fc.weight}_conv")
        inits.append((kernel_cache[key], kernels.conv_kernel(kernels.fc_matrix(w, trans_b=fc.trans_b), fshape, perm)))
    kernel = kernel_cache[key]
    attrs = {"kernel_shape": list(fshape[1:])}
    if strides:
        attrs["strides"] = list(strides)
    product = namer(f"{fc.output}_conv_out") if q.post else out
    name = fc.nodes[len(q.pre)].name or namer(fc.name)
    if q.format == "qdq":
        wdq = _copy(q.weight.node, namer, {q.weight.node.input[0]: kernel})
        _set_axis(wdq, None if q.weight.axis is None else 0)  # the kernel's output channels
        nodes.append(wdq)
        inputs = [x, wdq.output[0]]
        if q.bias is not None:
            inputs.append(_conv_bias(idx, namer, q.bias, fc.m, nodes, inits))
        nodes.append(helper.make_node("Conv", inputs, [product], name=name, **attrs))
    elif q.format in ("qlinear", "qgemm"):
        s = q.scales
        inputs = [x, s[0], s[1], kernel, s[2], s[3], s[4], s[5]]
        if q.bias is not None:  # int32, scale sx * sw, zero point 0: QLinearConv's bias as it is
            if tuple(idx.const_shape(q.bias)) == (fc.m,):
                inputs.append(q.bias)
            else:
                bname = namer(f"{q.bias}_conv")
                inits.append((bname, kernels.fc_bias(idx.value(q.bias), fc.m).astype(np.int32)))
                inputs.append(bname)
        nodes.append(helper.make_node("QLinearConv", inputs, [product], name=name, **attrs))
    else:  # integer
        mmi = fc.nodes[1]
        inputs = [x, kernel, nodes[0].output[2]]  # the DynamicQuantizeLinear's zero point, on the map
        if len(mmi.input) > 3 and mmi.input[3]:
            zw = idx.value(mmi.input[3])
            if zw.size > 1:  # all equal (match_matmul_integer): one zero point
                zname = namer(f"{mmi.input[3]}_conv")
                inits.append((zname, np.asarray(zw.reshape(-1)[0])))
                inputs.append(zname)
            else:
                inputs.append(mmi.input[3])
        nodes.append(helper.make_node("ConvInteger", inputs, [product], name=name, **attrs))
    if q.post:
        nodes_, inits_ = _emit_post(fc, q, product, out, idx, namer, spatial, nodes)
        nodes.extend(nodes_)
        inits.extend(inits_)
    return nodes, inits


def _set_axis(node: onnx.NodeProto, axis: int | None) -> None:
    """Per axis along ``axis`` (the kernel's or map's output channels), or per tensor (None)."""
    for a in list(node.attribute):
        if a.name == "axis":
            node.attribute.remove(a)
    if axis is not None:
        node.attribute.append(helper.make_attribute("axis", axis))


def _copy(node: onnx.NodeProto, namer, rename: dict) -> onnx.NodeProto:
    """A copy of ``node`` reading renamed inputs and writing fresh outputs."""
    new = onnx.NodeProto()
    new.CopyFrom(node)
    for i, name in enumerate(new.input):
        if name in rename:
            new.input[i] = rename[name]
    for i, name in enumerate(new.output):
        if name:
            new.output[i] = namer(f"{name}_map")
    if new.name:
        new.name = namer(f"{node.name}_map")
    return new


def _conv_bias(idx, namer, name: str, m: int, nodes: list, inits: list) -> str:
    """The Conv's bias ``[M]``: the tensor itself when it is one (a
    DequantizeLinear of int32 ``[M]`` stays as it is), else reshaped."""
    prod = idx.producer.get(name)
    shape = idx.const_shape(name) if prod is None else None
    if prod is not None and ops.is_quant_op(prod, "DequantizeLinear"):
        qshape = idx.const_shape(prod.input[0])
        if tuple(qshape) == (m,):
            return name
        qv = idx.value(prod.input[0])
        qname = namer(f"{prod.input[0]}_conv")
        inits.append((qname, np.ascontiguousarray(np.broadcast_to(qv.reshape(-1), (m,)))))
        new = _copy(prod, namer, {prod.input[0]: qname})
        _set_axis(new, 0 if idx.value(prod.input[1]).ndim else None)
        nodes.append(new)
        return new.output[0]
    if shape is not None and tuple(shape) == (m,):
        return name
    b = kernels.fc_bias(idx.value(name), m)
    bname = namer(f"{name}_conv")
    inits.append((bname, b))
    return bname


def _emit_post(fc, q: Quant, x: str, out: str, idx, namer, spatial: int, before: list):
    """The nodes after the product, re-emitted on the map: the chain tensor
    renamed, per-feature constants reshaped to ``[M, 1, ...]``."""
    nodes, inits = [], []
    rename = {fc.nodes[len(q.pre)].output[0]: x}  # the product's output
    if q.format == "integer":  # the DynamicQuantizeLinear's scale now comes from its copy on the map
        rename[q.pre[0].output[1]] = before[0].output[1]
    reshape = set(q.post_consts)
    last = len(q.post) - 1
    for i, node in enumerate(q.post):
        new = _copy(node, namer, rename)
        for j, inp in enumerate(node.input):
            if (i, j) in reshape:
                new.input[j] = _per_feature_const(idx, namer, inp, fc.m, spatial, nodes, inits)
        if i == last:
            new.output[0] = out
        for o_old, o_new in zip(node.output, new.output):
            if o_old:
                rename[o_old] = o_new
        nodes.append(new)
    return nodes, inits


def _per_feature_const(idx, namer, name: str, m: int, spatial: int, nodes: list, inits: list) -> str:
    """A per-feature constant (``[M]``, ``[1, M]`` or a scalar) as
    ``[M, 1, ...]`` for the map; a DequantizeLinear'd one keeps its integers
    (reshaped) and its DequantizeLinear (per feature: along axis 0)."""
    prod = idx.producer.get(name)
    if prod is not None and ops.is_quant_op(prod, "DequantizeLinear") and idx.value(prod.input[0]) is not None:
        qv = idx.value(prod.input[0])
        reshaped = kernels.per_feature(qv, m, spatial)
        if reshaped is qv:
            return name
        qname = namer(f"{prod.input[0]}_conv")
        inits.append((qname, np.ascontiguousarray(reshaped)))
        new = _copy(prod, namer, {prod.input[0]: qname})
        _set_axis(new, 0 if idx.value(prod.input[1]).ndim else None)
        nodes.append(new)
        return new.output[0]
    v = idx.value(name)
    reshaped = kernels.per_feature(v, m, spatial)
    if reshaped is v:
        return name
    cname = namer(f"{name}_conv")
    inits.append((cname, np.ascontiguousarray(reshaped)))
    return cname
