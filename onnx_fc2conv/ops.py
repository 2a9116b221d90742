"""What each ONNX op does to the positions of a map: one table of per-op facts.

A map is ``[N, C, *S]`` or a permutation of it (``[N, *S, C]`` after a
channels-last Transpose). An op acts **per position** when each output
position depends only on the inputs at that same position. Dense mode may only
let per-position ops, windowed ops with known geometry and channel-only
reshuffles stand in the trunk (geometry.py reads this table); an op that is
not in the table is not per position.

The facts, by kind:

- ``POINTWISE``: element-wise on one tensor (activations, Cast, Dropout...).
- ``BROADCAST``: element-wise over broadcast inputs (Add, Mul, Where...): per
  position when every constant operand is constant along the spatial axes.
- ``PER_CHANNEL``: element-wise with per-channel parameters on axis 1
  (BatchNormalization): per position while axis 1 is not spatial.
- :func:`acted_axes`: ops that act *along* some axes (Softmax, LayerNorm,
  reductions, Concat...), with each axis' source (attribute or input) and its
  default by opset: per position when none of those axes is spatial.
- ``WINDOWED``: Conv and the pools, whose geometry is composed (geometry.py).
- ``GLOBAL_POOLS``: pools over the whole map: never per position.
- ``CONTRIB_*``: onnxruntime's com.microsoft QOperator kernels (QLinearAdd,
  QLinearAveragePool, QLinearGlobalAveragePool...) sorted the same way; any
  other custom op is not per position.
- layout ops (Transpose, Reshape, Squeeze, Unsqueeze, Flatten, Slice, Gather,
  Pad, Shape) are handled by geometry.py, which maps their axes.
- the rest of what the rules ask of an op by name: which reshapes a collapse
  or a chain may hold (``RESHAPE_LIKE``, ``NOOP_RESHAPES``), which ops act
  along the class axis (``CLASS_AXIS``, ``AFTER_HEAD``, ``CLASS_LAST``,
  :func:`flattens`), the windowed pool a whole-map pool becomes
  (``WINDOWED_POOL``), which ops a constant may be folded through
  (``FOLDABLE``), the domains (:func:`is_default`, ``QUANT_DOMAINS``).

This module imports nothing of the package: every other module may read it.
"""

from __future__ import annotations

import onnx
from onnx import helper

DEFAULT_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"
# the domains of the quantized ops a quantized FC is made of (onnxruntime's contrib ops too)
QUANT_DOMAINS = DEFAULT_DOMAINS + (MS_DOMAIN,)
# the com.microsoft ops a quantized FC may be made of
QUANT_CUSTOM_OPS = frozenset({"QGemm", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def is_default(node: onnx.NodeProto) -> bool:
    """The node is a standard ONNX op (not a custom domain's)."""
    return node.domain in DEFAULT_DOMAINS


def is_quant_op(node: onnx.NodeProto, op: str) -> bool:
    """``node`` is ``op`` in a domain whose quantized ops we read (ai.onnx or com.microsoft)."""
    return node.op_type == op and node.domain in QUANT_DOMAINS

POINTWISE = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu",
    "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Swish", "Abs", "Neg", "Exp", "Log", "Sqrt", "Erf",
    "Identity", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos",
    "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Cast", "IsNaN", "IsInf", "Not", "Shrink",
})
# element-wise over inputs that broadcast; Clip's and Dropout's extra inputs
# are scalars, CastLike's second input only gives the type
BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "PRelu", "Where", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "Clip", "Dropout",
    "CastLike",
    # per tensor (scalar scale and zero point): element-wise; steps.py refuses them per axis
    "QuantizeLinear", "DequantizeLinear",
})
PER_CHANNEL = frozenset({"BatchNormalization"})
WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool", "QLinearConv", "ConvInteger"})
# the float windowed ops, whose strides, pads and dilations the à trous rewrite (atrous.py) changes
WINDOWED_FLOAT = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
                     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
# ops that act along the axes acted_axes() gives, and keep the rank (unless keepdims=0)
AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "CumSum", "TopK", "ArgMax",
                      "ArgMin", "LayerNormalization", "MeanVarianceNormalization", "InstanceNormalization",
                      "GroupNormalization", "LRN", "Concat", "Split", "MatMul"}) | REDUCES

# onnxruntime's contrib (com.microsoft) QOperator kernels, by what they do to
# positions (with per-tensor scales and zero points: scalars). Element-wise:
# the indices of their data inputs (the rest are scales and zero points).
CONTRIB_POINTWISE = {"QLinearAdd": (0, 3), "QLinearMul": (0, 3), "QLinearLeakyRelu": (0,),
                     "QLinearSigmoid": (0,)}
CONTRIB_WINDOWED = frozenset({"QLinearAveragePool"})        # kernel_shape, strides, pads as AveragePool
CONTRIB_GLOBAL_POOLS = frozenset({"QLinearGlobalAveragePool"})


def contrib(node: onnx.NodeProto, table) -> bool:
    """``node`` is a com.microsoft op in ``table``, on channels-first maps."""
    return node.domain == "com.microsoft" and node.op_type in table and not int(attr(node, "channels_last", 0))


# reshapes that keep row-major order: a collapse may hold any chain of them
RESHAPE_LIKE = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
# reshapes that may be a no-op on [N, M] features (a chain step then)
NOOP_RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"})
# broadcast ops whose extra inputs may be non-constant scalars
SCALAR_EXTRAS = frozenset({"Clip", "Dropout"})
# quantizers: element-wise per tensor only (scalar scale and zero point)
QUANTIZE = frozenset({"QuantizeLinear", "DequantizeLinear"})
SOFTMAX_LIKE = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
# ops that may act along the class axis of [N, M] scores
CLASS_AXIS = frozenset({"Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "LpNormalization",
                        "LayerNormalization"})
# ops along the class axis that end a classifier: they stay after the head in
# keep mode (where they see [N, M] again) and join only the dense tail
AFTER_HEAD = frozenset({"Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin"})
# ops that act from their axis to the last one at every opset
CLASS_LAST = frozenset({"LayerNormalization"})
# the windowed pool each whole-map pool becomes in dense mode
# ops that may be an FC (the probe reads the shapes around them)
FC_OPS = frozenset({"Gemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger"})
WINDOWED_POOL = {"GlobalAveragePool": "AveragePool", "ReduceMean": "AveragePool", "AveragePool": "AveragePool",
                 "GlobalMaxPool": "MaxPool", "ReduceMax": "MaxPool", "MaxPool": "MaxPool",
                 # onnxruntime's QOperator (com.microsoft): same inputs, scales and zero points
                 "QLinearGlobalAveragePool": "QLinearAveragePool"}
# Ops whose output is a pure function of their inputs and attributes: a node
# of these with constant inputs is a constant expression we may evaluate.
# DequantizeLinear is not one of them: an integer weight is read as integers
# by the quantized FC kinds (rules/quant.py) and stays an integer initializer;
# folding it would turn it into a float constant, silently.
FOLDABLE = frozenset({
    "Identity", "Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Flatten",
    "Concat", "Gather", "Slice", "ConstantOfShape", "Shape", "Size", "Expand", "Tile",
    "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow", "Abs",
    "Range", "Equal", "Where", "ReduceProd", "ReduceSum", "Min", "Max",
    "CastLike", "Split",
})


def flattens(op: str, opset: int) -> bool:
    """Softmax, LogSoftmax and Hardmax below opset 13 (and QLinearSoftmax of
    such an opset) flatten ``[axis:]`` into one dimension: they act from
    their axis to the last one."""
    return op in SOFTMAX_LIKE | {"QLinearSoftmax"} and opset < 13


def acts_to_last(op: str, opset: int) -> bool:
    """The op acts from its axis to the last: to act along the class axis
    alone, the class axis must be made last (steps.emit)."""
    return op in CLASS_LAST or flattens(op, opset)


def norm_axes(axes, rank: int) -> set[int]:
    """Axes as non-negative indices."""
    return {int(a) % rank for a in axes}


def axes_input(node, index: int, value) -> list[int] | None:
    if len(node.input) > index and node.input[index]:
        v = value(node.input[index])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return []


def acted_axes(node: onnx.NodeProto, rank: int, opset: int, value) -> set[int] | None:
    """The axes of the first input along which ``node`` combines values (a
    set of non-negative axes), or None when they cannot be known statically
    (an axis given by a non-constant input). ``value(name)`` returns a
    constant's value or None."""
    op = node.op_type
    if op == "QLinearSoftmax":  # com.microsoft: a Softmax of the opset its attribute names
        op, opset = "Softmax", int(attr(node, "opset", opset))
    if op in SOFTMAX_LIKE:
        if flattens(op, opset):
            axis = int(attr(node, "axis", 1)) % rank
            return set(range(axis, rank))
        return norm_axes([attr(node, "axis", -1)], rank)
    if op in ("LpNormalization", "TopK"):
        return norm_axes([attr(node, "axis", -1)], rank)
    if op in ("ArgMax", "ArgMin"):
        return norm_axes([attr(node, "axis", 0)], rank)
    if op == "CumSum":
        axes = axes_input(node, 1, value)
        return None if not axes else norm_axes(axes, rank)
    if op == "LayerNormalization":
        return set(range(int(attr(node, "axis", -1)) % rank, rank))
    if op == "MeanVarianceNormalization":
        return norm_axes(attr(node, "axes", [0, 2, 3]), rank)
    if op == "InstanceNormalization":
        return set(range(2, rank))
    if op == "GroupNormalization":
        return set(range(1, rank))
    if op == "LRN":
        return {1}
    if op in ("Concat", "Split"):
        return norm_axes([attr(node, "axis", 0)], rank)
    if op == "MatMul":  # contracts the last axis of A with a constant B
        return {rank - 1}
    if op in REDUCES:
        axes = attr(node, "axes", None)
        if axes is None:
            axes = axes_input(node, 1, value)
            if axes is None:
                return None
        if not axes:
            return set() if int(attr(node, "noop_with_empty_axes", 0)) else set(range(rank))
        return norm_axes(axes, rank)
    return None


def removes_axes(node: onnx.NodeProto, acted: set[int]) -> set[int]:
    """The axes a reduction drops from its output (keepdims=0), else none."""
    if (node.op_type in REDUCES or node.op_type in ("ArgMax", "ArgMin")) and not int(attr(node, "keepdims", 1)):
        return set(acted)
    return set()
