"""FCs over maps: a ``MatMul`` with a constant ``[K, M]`` weight (and an
optional ``Add`` of a per-feature bias) applied to a rank-4 or rank-5 tensor
``[N, *S, K]`` — ConvNeXt/EdgeNeXt blocks apply their MLPs this way to
channels-last maps. Each is a 1x1 Conv: ``Transpose`` to ``[N, K, *S]``,
``Conv`` with kernel ``W.T`` as ``[M, K, 1, ...]``, ``Transpose`` back, so the
output keeps its name, layout and values (in keep and in dense mode, where the
op is per position anyway). A MatMul over a rank-3 input (a token sequence:
ViT, MLP-Mixer) is not a map and stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import kernels, ops
from ..graph import node_key, node_label
from . import Context
from .fc import bias_add, conv_types


@dataclass(frozen=True)
class MapFC:
    name: str
    op: str                      # "MatMul" or "MatMul+Add"
    nodes: tuple
    input: str
    output: str
    weight: str
    bias: str | None
    m: int
    k: int
    rank: int


def match_map_fc(node: onnx.NodeProto, ctx: Context) -> MapFC | None:
    if node.op_type != "MatMul" or not ops.is_default(node):
        return None
    idx = ctx.idx
    a, b = node.input[0], node.input[1]
    wshape = idx.const_shape(b)
    rank = ctx.rank(a)
    if wshape is None or len(wshape) != 2 or idx.const_shape(a) is not None or rank not in (4, 5):
        return None
    if idx.elem_type(b) not in conv_types(idx.opset):
        return None
    k, m = wshape
    nodes, out, bias = bias_add(node, m, ctx)
    return MapFC(node_label(node), "MatMul+Add" if bias else "MatMul", nodes, a, out, b, bias, m, k, rank)


def emit(fc: MapFC, idx, namer) -> tuple[list, list]:
    """Transpose -> 1x1 Conv -> Transpose writing ``fc.output``: (nodes, initializers)."""
    r = fc.rank
    to_first = [0, r - 1] + list(range(1, r - 1))
    to_last = [0] + list(range(2, r)) + [1]
    x, y = namer(f"{fc.input}_channels_first"), namer(f"{fc.output}_channels_first")
    w = np.ascontiguousarray(idx.value(fc.weight).T).reshape((fc.m, fc.k) + (1,) * (r - 2))
    kname = namer(f"{fc.weight}_conv")
    inits = [(kname, w)]
    conv_inputs = [x, kname]
    if fc.bias is not None:
        bname = namer(f"{fc.bias}_conv")
        inits.append((bname, kernels.fc_bias(idx.value(fc.bias), fc.m).astype(w.dtype, copy=False)))
        conv_inputs.append(bname)
    nodes = [helper.make_node("Transpose", [fc.input], [x], name=namer(f"{fc.name}_to_channels_first"),
                              perm=to_first),
             helper.make_node("Conv", conv_inputs, [y], name=fc.nodes[0].name or namer(fc.name),
                              kernel_shape=[1] * (r - 2)),
             helper.make_node("Transpose", [y], [fc.output], name=namer(f"{fc.name}_to_channels_last"), perm=to_last)]
    return nodes, inits


def keys(fc: MapFC) -> set[str]:
    return {node_key(n) for n in fc.nodes}
