"""FC kinds: what counts as a fully connected layer.

- ``Gemm`` (transA = 0), ``Y = alpha * A @ B' + beta * C``, B constant 2-D;
- ``MatMul`` with a constant 2-D weight, plus an optional ``Add`` of a
  constant per-feature bias on either side;
- quantized FCs (rules/quant.py): QDQ ``Gemm``/``MatMul`` whose weight is a
  ``DequantizeLinear`` of integers, ``QLinearMatMul``, com.microsoft
  ``QGemm``, ``MatMulInteger``. They come first: a quantized weight is never
  read as a float constant.

Each kind is one function ``(node, ctx) -> FC | Refusal | None | False`` in
``KINDS`` (``False``: the node belongs to an FC matched from another node,
so no later kind may take it); :func:`match_fc` tries them in order and
refuses an FC whose dtype Conv does not take at the model's opset.
"""

from __future__ import annotations

import onnx

from .. import kernels, ops
from ..graph import attr, node_label
from . import FC, Context, Refusal
from . import quant as q


def conv_types(opset: int) -> set[int]:
    """The element types Conv (and the pools) accept at an opset."""
    types = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    return types | {onnx.TensorProto.BFLOAT16} if opset >= 22 else types


def gemm(node: onnx.NodeProto, ctx: Context) -> FC | Refusal | None:
    if node.op_type != "Gemm":
        return None
    idx = ctx.idx
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    wshape = idx.const_shape(b)
    if wshape is None:
        return Refusal(f"its weight {b!r} is not a constant", node)
    if len(wshape) != 2:
        return Refusal(f"its weight {b!r} has rank {len(wshape)}, not 2", node)
    if attr(node, "transA", 0):
        return Refusal("transA=1: the Gemm reads its input transposed, so it is not a convolution over the "
                       "feature map", node)
    trans_b = bool(attr(node, "transB", 0))
    m, k = (wshape[0], wshape[1]) if trans_b else (wshape[1], wshape[0])
    alpha = float(attr(node, "alpha", 1.0))
    beta = float(attr(node, "beta", 1.0))
    if c is not None:
        cv = idx.value(c)
        if cv is None:
            return Refusal(f"its bias {c!r} is not a constant", node)
        try:
            kernels.fc_bias(cv, m, beta=beta)
        except kernels.NotPerFeature as exc:
            return Refusal(f"its {exc}", node)
    return FC(node_label(node), "Gemm", (node,), a, node.output[0], b, trans_b, alpha, beta, c, m, k)


def matmul(node: onnx.NodeProto, ctx: Context) -> FC | Refusal | None:
    if node.op_type != "MatMul":
        return None
    idx = ctx.idx
    a, b = node.input[0], node.input[1]
    wshape = idx.const_shape(b)
    if wshape is None or idx.const_shape(a) is not None:
        return None  # a product of two activations is not an FC layer
    if len(wshape) != 2:
        return Refusal(f"its weight {b!r} has rank {len(wshape)}, not 2", node)
    rank = ctx.rank(a)
    if rank is not None and rank != 2:
        return Refusal(f"its input {a!r} has rank {rank}: a MatMul over more than a batch of feature vectors "
                       "is not an FC on a flattened map", node)
    k, m = wshape
    nodes, out, bias = bias_add(node, m, ctx)
    return FC(node_label(node), "MatMul+Add" if bias else "MatMul", nodes, a, out, b, False, 1.0, 1.0, bias, m, k)


def bias_add(node: onnx.NodeProto, m: int, ctx: Context) -> tuple:
    """A MatMul and the ``Add`` of a constant per-feature bias that is its only
    consumer: ``(nodes, output, bias name)``, or the MatMul alone."""
    idx = ctx.idx
    add = idx.only_consumer(node.output[0])
    if add is not None and add.op_type == "Add" and ops.is_default(add) and node.output[0] not in idx.outputs:
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        value = idx.value(other)
        if value is not None:
            try:
                kernels.fc_bias(value, m)
                return (node, add), add.output[0], other
            except kernels.NotPerFeature:
                pass
    return (node,), node.output[0], None


# quantized kinds first (rules/quant.py): a quantized weight is never read as a float constant
KINDS = (q.match_qdq, q.match_qlinear_matmul, q.match_qgemm, q.match_matmul_integer, gemm, matmul)


def match_fc(node: onnx.NodeProto, ctx: Context) -> FC | Refusal | None:
    """An FC, a Refusal (an FC we will not convert), or None (not an FC)."""
    if not ops.is_default(node) and not (node.domain == ops.MS_DOMAIN and node.op_type in ops.QUANT_CUSTOM_OPS):
        return None
    for kind in KINDS:
        found = kind(node, ctx)
        if found is not None:
            break
    else:
        return None
    if found is False:
        return None
    if isinstance(found, FC) and found.quant is not None:
        elem = found.quant.float_type  # the dequantized type (QDQ); integer kernels: QLinearConv/ConvInteger
        if elem is not None and elem not in conv_types(ctx.idx.opset):
            name = onnx.helper.tensor_dtype_to_string(elem).replace("TensorProto.", "").lower()
            return Refusal(f"its weight dequantizes to {name}, which Conv does not take at opset {ctx.idx.opset}", node)
    elif isinstance(found, FC):
        elem = ctx.idx.elem_type(found.weight)
        if elem not in conv_types(ctx.idx.opset):
            name = onnx.helper.tensor_dtype_to_string(elem).replace("TensorProto.", "").lower()
            return Refusal(f"Conv does not take {name} at opset {ctx.idx.opset}"
                           + (" (bfloat16 from opset 22)" if elem == onnx.TensorProto.BFLOAT16 else ""), node)
    return found
