"""Pattern rules: each module here knows one family of ONNX patterns.

- ``fc.py``: what an FC layer is (Gemm; MatMul + Add) -> :class:`FC`;
- ``quant.py``: the quantized FC kinds (QDQ, QOperator, dynamic) -> an
  :class:`FC` with its :class:`Quant`, and their integer Conv form;
- ``collapse.py``: how a feature map is flattened before the first FC
  (Flatten / Reshape / shape chain, NHWC Transpose, global pools) -> ``Collapse``;
- ``steps.py``: the per-position ops between and after FCs, and how each is
  re-emitted on the Conv layout (keep and dense form) -> ``Step``.

A rule's ``match`` never mutates the graph. It returns what it matched, or a
:class:`Refusal` with the node and one sentence saying why not (or None when
the node is not its business at all). find.py runs the rules; plan.py uses
their emit functions. Per-op facts (which axes an op acts along, by opset)
live in ops.py, not here.

The types every rule shares (:class:`Refusal`, :class:`Context`, :class:`FC`
and how a quantized one is quantized, :class:`Quant` / :class:`Dequant`) live
here, so that no rule module needs another one for its types.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..graph import GraphIndex


@dataclass(frozen=True)
class Refusal:
    """Why a pattern does not apply: one sentence, and the node it is about."""
    reason: str
    node: onnx.NodeProto | None = None

    def __str__(self) -> str:
        return self.reason


@dataclass
class Context:
    """What every rule reads: the graph index and the inferred shapes of one
    conversion (built once in api.py and passed down)."""
    idx: GraphIndex
    shapes: dict

    def shape(self, name: str):
        info = self.shapes.get(name)
        return None if info is None else info.shape

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)



@dataclass(frozen=True)
class Dequant:
    """``DequantizeLinear(q, scale, zero_point)`` of a constant integer tensor."""
    node: onnx.NodeProto
    q: str                       # the integer tensor
    shape: tuple
    axis: int | None             # the axis of a per-axis scale (non-negative), None per tensor
    float_type: int              # the dequantized values' type (the scale's)


@dataclass(frozen=True)
class Quant:
    """How an FC is quantized (``FC.quant``); plan.py hands it to ``rules.quant.emit``."""
    format: str                  # "qdq", "qlinear", "qgemm", "integer"
    pre: tuple = ()              # the activation quantizer nodes in front (re-emitted on the map)
    weight: Dequant | None = None   # QDQ: the weight's DequantizeLinear
    bias: str | None = None      # QDQ/QGemm: the bias tensor (the Conv's or QLinearConv's)
    post: tuple = ()             # nodes after the product, re-emitted on the map (Q, DQ, Add; QLinearAdd; Cast, Mul)
    post_consts: tuple = ()      # (post node index, input index): per-feature constants to reshape to [M, 1, ...]
    scales: tuple = ()           # QOperator: the op's inputs (x scale, x zp, w scale, w zp, y scale, y zp)
    float_type: int | None = None   # QDQ: the dequantized type (for Conv's type check)


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
    quant: Quant | None = None   # how a quantized FC is quantized (None: a float FC)
