"""Every FC, on request (``--all-fcs``, keep mode): FCs that see no spatial
map, for compilers that accept only Conv (what onnxsim's opt-in
``fuse_matmul_into_conv`` and openvino2onnx's ``gemm_to_conv`` do).

- **Plain vectors**: an FC on ``A [N, K]`` (an MLP, a head behind a
  non-spatial op) is the 1x1 Conv of ``A`` seen as the map ``[N, K, 1, 1]``:
  ``Y[n, m] = sum_k W[m, k] A[n, k] = Conv(A[:, :, None, None], W[:, :, None,
  None])[n, m, 0, 0]``. :func:`vector_collapse` gives that view as a
  ``Collapse`` (an Unsqueeze of two unit axes), so the FC and its chain of
  later FCs and per-position steps convert as any head does, with one
  Flatten at its end.
- **Tokens** ``[N, T, C]`` (rank 3): ``MatMul`` with a constant ``[C, M]``
  weight (+ Add of a per-feature bias) acts on each token alone: a Conv1d
  with kernel ``W.T`` as ``[M, C, 1]`` over ``Transpose(0, 2, 1)`` of the
  input, transposed back (rules/mapfc.py's form, one spatial axis).
- **Gemm with transA = 1** (``Y = alpha A.T B' + beta C``, ``A [K, N]``):
  ``Transpose(A)``, then the vector form above.

By default none of this applies: only FCs on spatial maps and their chains
convert (DESIGN.md). A weight must be a constant 2-D matrix; a Gemm bias
must be per output feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import kernels, ops
from ..graph import attr, node_key, node_label
from . import Context
from .collapse import Collapse
from .fc import FC, bias_add, conv_types
from .mapfc import MapFC


def vector_collapse(fc: FC, ctx: Context) -> Collapse | None:
    """``fc``'s input ``[N, K]`` as the map ``[N, K, 1, 1]``, or None when
    its input is not a batch of K-vectors."""
    shape = ctx.shape(fc.input)
    if shape is None or len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != fc.k):
        return None
    return Collapse(fc.input, (0, 1, 2, 3), (fc.k, 1, 1), (), "vector", "NC", 2)


@dataclass(frozen=True)
class TransAGemm:
    """A Gemm with transA = 1 and a constant weight."""
    name: str
    node: onnx.NodeProto
    m: int
    k: int

    @property
    def nodes(self) -> tuple:
        return (self.node,)


def match_token_fc(node: onnx.NodeProto, ctx: Context) -> MapFC | None:
    """A MatMul with a constant ``[C, M]`` weight on a rank-3 ``[N, T, C]``
    (+ the Add of a per-feature bias): the channels-last map FC of
    rules/mapfc.py with one spatial axis."""
    if node.op_type != "MatMul" or not ops.is_default(node) or ctx.rank(node.input[0]) != 3:
        return None
    idx = ctx.idx
    a, b = node.input[0], node.input[1]
    wshape = idx.const_shape(b)
    if wshape is None or len(wshape) != 2 or idx.const_shape(a) is not None \
            or idx.elem_type(b) not in conv_types(idx.opset):
        return None
    k, m = wshape
    nodes, out, bias = bias_add(node, m, ctx)
    return MapFC(node_label(node), "MatMul+Add" if bias else "MatMul", nodes, a, out, b, bias, m, k, 3)


def match_trans_a(node: onnx.NodeProto, ctx: Context) -> TransAGemm | None:
    """A Gemm with transA = 1, a constant 2-D weight and a per-feature (or no) bias."""
    if node.op_type != "Gemm" or not ops.is_default(node) or not int(attr(node, "transA", 0)):
        return None
    idx = ctx.idx
    wshape = idx.const_shape(node.input[1])
    if wshape is None or len(wshape) != 2 or idx.elem_type(node.input[1]) not in conv_types(idx.opset):
        return None
    trans_b = bool(attr(node, "transB", 0))
    m, k = (wshape[0], wshape[1]) if trans_b else (wshape[1], wshape[0])
    if len(node.input) > 2 and node.input[2]:
        c = idx.value(node.input[2])
        if c is None:
            return None
        try:
            kernels.fc_bias(c, m, beta=float(attr(node, "beta", 1.0)))
        except kernels.NotPerFeature:
            return None
    return TransAGemm(node_label(node), node, m, k)


def emit_trans_a(fc: TransAGemm, idx, namer) -> tuple[list, list]:
    """Transpose -> Unsqueeze -> 1x1 Conv -> Flatten writing the Gemm's output."""
    node = fc.node
    a, out = node.input[0], node.output[0]
    w = kernels.fc_matrix(idx.value(node.input[1]), trans_b=bool(attr(node, "transB", 0)),
                          alpha=float(attr(node, "alpha", 1.0)))
    kname = namer(f"{node.input[1]}_conv")
    inits = [(kname, np.ascontiguousarray(w).reshape(fc.m, fc.k, 1, 1))]
    conv_inputs = [namer(f"{a}_map"), kname]
    if len(node.input) > 2 and node.input[2]:
        b = kernels.fc_bias(idx.value(node.input[2]), fc.m, beta=float(attr(node, "beta", 1.0)))
        if b is not None:
            bname = namer(f"{node.input[2]}_conv")
            inits.append((bname, b.astype(w.dtype, copy=False)))
            conv_inputs.append(bname)
    t, y = namer(f"{a}_t"), namer(f"{out}_conv")
    nodes = [helper.make_node("Transpose", [a], [t], name=namer(f"{fc.name}_transpose_a"), perm=[1, 0])]
    if idx.opset >= 13:
        axes = namer(f"{a}_map_axes")
        inits.append((axes, np.array([2, 3], dtype=np.int64)))
        nodes.append(helper.make_node("Unsqueeze", [t, axes], [conv_inputs[0]], name=namer(f"{fc.name}_unsqueeze")))
    else:
        nodes.append(helper.make_node("Unsqueeze", [t], [conv_inputs[0]], name=namer(f"{fc.name}_unsqueeze"),
                                      axes=[2, 3]))
    nodes.append(helper.make_node("Conv", conv_inputs, [y], name=node.name or namer(fc.name), kernel_shape=[1, 1]))
    nodes.append(helper.make_node("Flatten", [y], [out], name=namer(f"{fc.name}_flatten"), axis=1))
    return nodes, inits


def keys(fc) -> set[str]:
    return {node_key(n) for n in fc.nodes}
