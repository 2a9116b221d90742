"""Pattern rules: each module here knows one family of ONNX patterns.

- ``fc.py``: what an FC layer is (Gemm; MatMul + Add) -> :class:`FC`;
- ``collapse.py``: how a feature map is flattened before the first FC
  (Flatten / Reshape / shape chain, NHWC Transpose, global pools) -> ``Collapse``;
- ``steps.py``: the per-position ops between and after FCs, and how each is
  re-emitted on the Conv layout (keep and dense form) -> ``Step``.

A rule's ``match`` never mutates the graph. It returns what it matched, or a
:class:`Refusal` with the node and one sentence saying why not (or None when
the node is not its business at all). find.py runs the rules; plan.py uses
their emit functions. Per-op facts (which axes an op acts along, by opset)
live in ops.py, not here.
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

