"""Plan the rewrite of each head: every number the rewrite needs (kernels,
biases, reshaped constants, tensor names) is computed here, and nothing in
the graph is touched. Applying a plan (rewrite.py) decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from . import kernels
from .find import FC, Head, item_nodes
from .graph import GraphIndex, node_key
from .rules import quant
from .rules.steps import emit


@dataclass(frozen=True)
class HeadPlan:
    anchor: str                      # new nodes go where this (removed) node was (its node_key)
    nodes: tuple                     # new nodes, in order
    initializers: tuple              # (name, np.ndarray) pairs
    removed: frozenset               # node_keys of the nodes the head replaces
    retyped: tuple = ()              # (initializer name, new dims): a weight reused as a kernel in place


@dataclass(frozen=True)
class SignaturePlan:
    """What dense mode changes besides nodes (dense.signature):
    rewrite.apply makes these input dims symbolic, replaces every value_info
    by ``value_info``, and infers the shapes of ``outputs`` afresh, naming a
    spatial dim inference leaves unknown ``<output>_<spatial name>``."""
    symbolic: tuple = ()         # (input name, axis, dim_param)
    value_info: tuple = ()       # (tensor name, elem type, dims: int, str or None each)
    outputs: tuple = ()          # graph outputs whose shapes are inferred afresh
    spatial_names: tuple = ()    # the names of the map's spatial axes ("height", "width")


class Namer:
    """Fresh tensor and node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used: set[str] = {i.name for i in graph.input} | {o.name for o in graph.output}
        self.used |= {t.name for t in graph.initializer} | {v.name for v in graph.value_info}
        for n in graph.node:
            self.used.update(n.input)
            self.used.update(n.output)
            self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def plan_heads(model: onnx.ModelProto, heads: list[Head], dense=None, *, fold_batch: bool = False,
               idx: GraphIndex | None = None, map_fcs=(), vec_fcs=()) -> list[HeadPlan]:
    """Plans for keep mode, or for dense mode when ``dense`` (a
    ``dense.DensePlan`` for the same heads) is given.

    ``fold_batch`` (keep mode): the first Conv sees the batch folded into its
    first spatial axis, ``[N,C,H,W] -> [1,C,N*H,W]`` with stride ``H`` there,
    so the head runs as one matrix product for the whole batch instead of one
    per image (onnxruntime's CPU Conv loops over the batch); the chain works
    on ``[1,M,N,1]`` and is turned back into ``[N,M]`` at the end."""
    idx = idx or GraphIndex(model)
    namer = Namer(model.graph)
    pairs = _with_branches(heads, dense)
    heads = [h for h, _ in pairs]
    kernel_cache: dict[tuple, str] = {}
    for name, key in _reusable_weights(model, idx, heads).items():
        kernel_cache[key] = name
    # Where an input has symbolic spatial dims, the graph does not fix the
    # map's size: the FC's K did (a wrong size fails in the original), so the
    # keep-mode output pins the features with Reshape [N, M] instead of a
    # Flatten that would accept any map as [N, M*h'*w'].
    from .shapes import input_infos

    pin = idx.opset >= 5 and any(info.shape is None or not all(isinstance(d, int) for d in info.shape[1:])
                                 for info in input_infos(model).values())
    plans = []
    for head, dh in pairs:
        plans.append(_plan_head(idx, namer, head, kernel_cache, dh,
                                fold_batch and dense is None and idx.opset >= 5, pin))
    if dense is not None:
        plans.extend(plan_trunk_fixes(idx, namer, dense))
    from .rules import mapfc

    for fc in map_fcs:  # FCs over channels-last maps: 1x1 Convs between Transposes
        nodes, inits = mapfc.emit(fc, idx, namer)
        plans.append(HeadPlan(node_key(fc.nodes[0]), tuple(nodes), tuple(inits), frozenset(mapfc.keys(fc))))
    from .rules import vecfc

    for fc in vec_fcs:  # --all-fcs: token MatMuls (a Conv1d between Transposes), Gemms with transA=1
        nodes, inits = mapfc.emit(fc, idx, namer) if isinstance(fc, mapfc.MapFC) else vecfc.emit_trans_a(fc, idx, namer)
        plans.append(HeadPlan(node_key(fc.nodes[0]), tuple(nodes), tuple(inits), frozenset(vecfc.keys(fc))))
    return plans


def _with_branches(heads: list[Head], dense) -> list[tuple]:
    """(head, its DenseHead or None) for every head, each followed by its
    branches (find.Branch) as heads of their own whose map is the shared
    one: in keep mode the shared ``[N, M]`` vector unsqueezed to ``[N, M,
    1, ...]``, in dense mode the shared score map itself (its original name).
    A branch's DenseHead pools nothing and has no tail: its head's has the
    tails and outputs of all its branches (dense.py)."""
    from dataclasses import replace

    from .rules.collapse import Collapse

    pairs = []
    for i, head in enumerate(heads):
        dh = dense.heads[i] if dense is not None else None
        pairs.append((head, dh))
        s = head.spatial_rank
        for b in head.all_branches():
            col = Collapse(b.start, tuple(range(2 + s)), (b.m_in,) + (1,) * s, (), "fork", "NC",
                           0 if dh is not None else s)
            bdh = replace(dh, pool=None, pool_op=None, tail=(), segment_pools=(), segment_views=()) if dh else None
            pairs.append((Head(col, b.items, b.end), bdh))
    return pairs


def plan_trunk_fixes(idx: GraphIndex, namer: Namer, dense) -> list[HeadPlan]:
    """Dense mode: trunk Reshapes that pin the spatial size take it from their input."""
    out = []
    for node, s, middle in dense.trunk_reshapes:
        nodes, inits = plan_trunk_reshape(idx, namer, node, s, middle)
        out.append(HeadPlan(node_key(node), tuple(nodes), tuple(inits), frozenset({node_key(node)})))
    return out


def _kernel_keys(head: Head):
    """(FC, key, kernel feature shape, perm) for each FC of a head."""
    spatial = head.spatial_rank
    first = True
    for item in head.items:
        if isinstance(item, FC):
            fshape = head.collapse.feature_shape if first else (item.k,) + (1,) * spatial
            perm = head.collapse.perm if first else None
            if perm is not None and tuple(perm) == tuple(range(len(perm))):
                perm = None
            yield item, (item.weight, item.trans_b, item.alpha, perm, fshape), fshape, perm
            first = False


def _reusable_weights(model: onnx.ModelProto, idx: GraphIndex, heads: list[Head]) -> dict[str, tuple]:
    """Weights whose kernel is only a change of dims (transB=1, alpha=1, no
    permutation) and that nothing but converted FCs reads: they become their
    kernel in place, so no byte of them is copied."""
    fc_nodes = {node_key(n) for h in heads for it in h.items if isinstance(it, FC) for n in it.nodes}
    keys: dict[str, set] = {}
    for head in heads:
        for fc, key, _, perm in _kernel_keys(head):
            keys.setdefault(fc.weight, set()).add(key if (fc.trans_b and fc.alpha == 1.0 and perm is None
                                                          and fc.quant is None) else None)
    # An initializer that is also a graph input may be fed by the user (IR >= 4):
    # its dims are not ours to change. Under IR < 4 every initializer is
    # listed as an input, and the rewrite updates that listing too.
    inputs = {i.name for i in model.graph.input} if model.ir_version >= 4 else set()
    out = {}
    for name, ks in keys.items():
        if len(ks) != 1 or None in ks or name not in idx.initializers or name in inputs:
            continue
        if name in idx.outputs or name in idx.sub_reads:
            continue
        if all(node_key(n) in fc_nodes for n in idx.consumers.get(name, ())):
            out[name] = next(iter(ks))
    return out


@dataclass
class _Out:
    """What one head's plan collects, in order, while its parts are planned."""
    nodes: list = field(default_factory=list)       # new nodes, in order
    inits: list = field(default_factory=list)       # (name, np.ndarray) pairs
    removed: set = field(default_factory=set)       # node_keys of the nodes replaced
    retyped: list = field(default_factory=list)     # (initializer name, new dims)

    def add(self, nodes, inits) -> None:
        self.nodes.extend(nodes)
        self.inits.extend(inits)


def _plan_head(idx: GraphIndex, namer: Namer, head: Head, kernel_cache: dict, dh=None,
               fold: bool = False, pin: bool = False) -> HeadPlan:
    """Keep mode: new tensors get fresh names and one Flatten writes the
    head's last original tensor. Dense mode (``dh``): the new nodes write
    the original tensor names, which now hold maps, through to the outputs."""
    out = _Out()
    x = _map_source(idx, namer, head, dh, out)
    x = _collapse_steps(idx, namer, head, dh, x, out)
    if fold:
        x = _fold_batch(namer, head, x, out)
    x = _items(idx, namer, head, kernel_cache, dh, fold, x, out)
    if dh is None:
        _keep_end(namer, head, fold, pin, x, out)
    else:
        _dense_tail(idx, namer, head, dh, out)
    for item in head.items:
        out.removed.update(node_key(n) for n in item_nodes(item))
    anchor = node_key(item_nodes(head.items[0])[0])
    return HeadPlan(anchor, tuple(out.nodes), tuple(out.inits), frozenset(out.removed), tuple(out.retyped))


def _map_source(idx: GraphIndex, namer: Namer, head: Head, dh, out: _Out) -> str:
    """The map the first Conv reads: the collapse's source, its windowed pool
    (dense), or a keepdims=0 reduction's output unsqueezed back to a map; the
    segment's pools become windowed and its identity views Identity (dense)."""
    col = head.collapse
    x = col.source
    if dh is not None and dh.pool is not None:
        y = namer(f"{x}_map") if col.unsqueeze else x
        attrs = {"kernel_shape": list(dh.window), "strides": [1] * len(dh.window)}
        source, extra = dh.source, []
        if dh.source_perm:  # a channels-last map pooled in place: channels first for the pool
            source = namer(f"{dh.source}_channels_first")
            out.nodes.append(helper.make_node("Transpose", [dh.source], [source],
                                              name=namer(f"{dh.source}_to_channels_first"), perm=list(dh.source_perm)))
        if dh.pool.domain == "com.microsoft":  # QLinearGlobalAveragePool: its scales, zero points and domain
            attrs["domain"] = dh.pool.domain
            extra = list(dh.pool.input[1:])
        pooled = y
        if dh.pool_in_float:
            cast = namer(f"{source}_float")
            out.nodes.append(helper.make_node("Cast", [source], [cast], name=namer(f"{source}_to_float"),
                                              to=onnx.TensorProto.FLOAT))
            source, pooled = cast, namer(f"{y}_float")
        out.nodes.append(helper.make_node(dh.pool_op, [source] + extra, [pooled],
                                          name=dh.pool.name or namer("window_pool"), **attrs))
        if dh.pool_in_float:
            out.nodes.append(helper.make_node("Cast", [pooled], [y], name=namer(f"{y}_to_double"),
                                              to=onnx.TensorProto.DOUBLE))
        out.removed.add(node_key(dh.pool))
        x = y
    elif col.unsqueeze:
        y = namer(f"{x}_map")
        axes = list(range(2, 2 + col.unsqueeze))
        if idx.opset >= 13:
            axes_name = namer(f"{x}_map_axes")
            out.inits.append((axes_name, np.array(axes, dtype=np.int64)))
            out.nodes.append(helper.make_node("Unsqueeze", [x, axes_name], [y], name=namer(f"{x}_unsqueeze")))
        else:
            out.nodes.append(helper.make_node("Unsqueeze", [x], [y], name=namer(f"{x}_unsqueeze"), axes=axes))
        x = y
    for pool, pool_op in (dh.segment_pools if dh is not None else ()):
        # the pool's output becomes a map; the per-position ops after it stay
        out.nodes.append(helper.make_node(pool_op, [pool.input[0]], [pool.output[0]],
                                          name=pool.name or namer("window_pool"),
                                          kernel_shape=list(dh.window), strides=[1] * len(dh.window)))
        out.removed.add(node_key(pool))
    for view in (dh.segment_views if dh is not None else ()):  # Gather(Reshape(x, [-1]), arange) -> x
        out.nodes.append(helper.make_node("Identity", [idx.producer[view.input[0]].input[0]], [view.output[0]],
                                          name=view.name or namer("view")))
        out.removed.add(node_key(view))
    return x


def _collapse_steps(idx: GraphIndex, namer: Namer, head: Head, dh, x: str, out: _Out) -> str:
    """The collapse's per-position steps, on the map: the same as on the flattened vector."""
    for step in head.collapse.steps:
        y = namer(f"{step.node.output[0]}_map")
        new_nodes, new_inits = emit(step, x, y, namer, head.spatial_rank, idx.opset, dense=dh is not None)
        out.add(new_nodes, new_inits)
        x = y if new_nodes else x
    return x


def _fold_batch(namer: Namer, head: Head, x: str, out: _Out) -> str:
    """``[N, C, *S] -> [1, C, N*S0, ...]``: the batch folded into the first spatial axis."""
    col, spatial = head.collapse, head.spatial_rank
    c, sizes = col.feature_shape[0], col.feature_shape[1:]
    t1, t2, shape = namer(f"{x}_cn"), namer(f"{x}_batch_folded"), namer(f"{x}_fold_shape")
    out.nodes.append(helper.make_node("Transpose", [x], [t1], name=namer(f"{x}_to_cn"),
                                      perm=[1, 0] + list(range(2, 2 + spatial))))
    out.inits.append((shape, np.array([1, c, -1] + list(sizes[1:]), dtype=np.int64)))
    out.nodes.append(helper.make_node("Reshape", [t1, shape], [t2], name=namer(f"{x}_fold")))
    return t2


def _items(idx: GraphIndex, namer: Namer, head: Head, kernel_cache: dict, dh, fold: bool, x: str,
           out: _Out) -> str:
    """The head's FCs as Convs (quantized ones by rules/quant.py) and its steps, in order."""
    spatial = head.spatial_rank
    first_conv = True
    keys = {fc.output: (key, fshape, perm) for fc, key, fshape, perm in _kernel_keys(head)}
    for item in head.items:
        if isinstance(item, FC):
            key, fshape, perm = keys[item.output]
            if item.quant is not None:  # integer kernel and its quantized op (rules/quant.py)
                y = item.output if dh is not None else namer(f"{item.output}_conv")
                strides = [int(fshape[1])] + [1] * (spatial - 1) if fold and first_conv else None
                out.add(*quant.emit(item, x, y, idx, namer, kernel_cache, fshape, perm, strides))
                first_conv, x = False, y
                continue
            x = _conv(idx, namer, item, key, fshape, perm, kernel_cache, dh, fold and first_conv, x, out)
            first_conv = False
        else:
            y = item.node.output[0] if dh is not None else namer(f"{item.node.output[0]}_conv")
            new_nodes, new_inits = emit(item, x, y, namer, spatial, idx.opset, dense=dh is not None)
            out.add(new_nodes, new_inits)
            if new_nodes:
                x = y
    return x


def _conv(idx: GraphIndex, namer: Namer, item: FC, key, fshape, perm, kernel_cache: dict, dh, folded: bool,
          x: str, out: _Out) -> str:
    """One float FC as a Conv: its kernel (once per weight and layout, or the
    weight itself re-dimensioned), its bias, the node."""
    spatial = len(fshape) - 1
    if kernel_cache.get(key) == item.weight:
        out.retyped.append((item.weight, (item.m,) + tuple(fshape)))
    elif key not in kernel_cache:
        w = idx.value(item.weight)
        kernel = kernels.conv_kernel(kernels.fc_matrix(w, trans_b=item.trans_b, alpha=item.alpha), fshape, perm)
        kernel_cache[key] = namer(f"{item.weight}_conv")
        out.inits.append((kernel_cache[key], kernel))
    conv_inputs = [x, kernel_cache[key]]
    if item.bias is not None:
        b = kernels.fc_bias(idx.value(item.bias), item.m, beta=item.beta)
        if b is not None:
            bname = namer(f"{item.bias}_conv")
            out.inits.append((bname, b.astype(helper.tensor_dtype_to_np_dtype(idx.elem_type(item.weight)),
                                              copy=False)))
            conv_inputs.append(bname)
    y = item.output if dh is not None else namer(f"{item.output}_conv")
    attrs = {"kernel_shape": list(fshape[1:])}
    if folded:
        attrs["strides"] = [int(fshape[1])] + [1] * (spatial - 1)
    out.nodes.append(helper.make_node("Conv", conv_inputs, [y], name=item.nodes[0].name or namer(item.name), **attrs))
    return y


def _keep_end(namer: Namer, head: Head, fold: bool, pin: bool, x: str, out: _Out) -> None:
    """Keep mode: the map back to ``[N, M]`` under the head's last original name."""
    spatial = head.spatial_rank
    if fold:  # [1, M, N, 1...] -> [N, M, 1, 1...]
        t = namer(f"{head.end}_unfolded")
        out.nodes.append(helper.make_node("Transpose", [x], [t], name=namer(f"{head.end}_unfold"),
                                          perm=[2, 1, 0] + list(range(3, 2 + spatial))))
        x = t
    if pin:
        shape = namer(f"{head.end}_features")
        out.inits.append((shape, np.array([0, head.fcs[-1].m], dtype=np.int64)))
        out.nodes.append(helper.make_node("Reshape", [x, shape], [head.end], name=namer(f"{head.end}_flatten")))
    else:
        out.nodes.append(helper.make_node("Flatten", [x], [head.end], name=namer(f"{head.end}_flatten"), axis=1))


def _dense_tail(idx: GraphIndex, namer: Namer, head: Head, dh, out: _Out) -> None:
    """Dense mode: the steps after the head, on the score map (per position)."""
    for step in dh.tail:
        new_nodes, new_inits = emit(step, step.input, step.node.output[0], namer,
                                    head.spatial_rank, idx.opset, dense=True, suffix="_dense")
        out.add(new_nodes, new_inits)
        out.removed.update(node_key(n) for n in step.nodes)


def plan_trunk_reshape(idx: GraphIndex, namer, node: onnx.NodeProto, s: int, middle: list):
    """A Reshape that pins the spatial size (a channel shuffle) gets its
    shape from its input: ``Concat(Shape(x)[0], middle, Shape(x)[-s:])``.
    Returns (nodes, initializers)."""
    x = node.input[0]
    sh, b, sp, shape = (namer(f"{x}_shape"), namer(f"{x}_batch"), namer(f"{x}_spatial"), namer(f"{x}_dense_shape"))
    first, last, mid = namer(f"{x}_i0"), namer(f"{x}_ispatial"), namer(f"{x}_middle")
    inits = [(first, np.array([0], np.int64)), (last, np.arange(-s, 0, dtype=np.int64)),
             (mid, np.array(middle, np.int64))]
    reshape = onnx.NodeProto()
    reshape.CopyFrom(node)
    reshape.input[1] = shape
    nodes = [helper.make_node("Shape", [x], [sh], name=namer(f"{node.name}_shape")),
             helper.make_node("Gather", [sh, first], [b], name=namer(f"{node.name}_batch"), axis=0),
             helper.make_node("Gather", [sh, last], [sp], name=namer(f"{node.name}_spatial"), axis=0),
             helper.make_node("Concat", [b, mid, sp], [shape], name=namer(f"{node.name}_concat"), axis=0),
             reshape]
    return nodes, inits
