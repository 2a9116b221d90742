"""Plan the rewrite of each head: every number the rewrite needs (kernels,
biases, reshaped constants, tensor names) is computed here, and nothing in
the graph is touched. Applying a plan (rewrite.py) decides nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from . import kernels
from .find import FC, Head, item_nodes
from .graph import GraphIndex, node_key
from .rules.steps import emit


@dataclass(frozen=True)
class HeadPlan:
    anchor: str                      # new nodes go where this (removed) node was (its node_key)
    nodes: tuple                     # new nodes, in order
    initializers: tuple              # (name, np.ndarray) pairs
    removed: frozenset               # node_keys of the nodes the head replaces
    retyped: tuple = ()              # (initializer name, new dims): a weight reused as a kernel in place


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


def plan_heads(model: onnx.ModelProto, heads: list[Head], dense=None, shapes=None,
               fold_batch: bool = False, idx: GraphIndex | None = None, map_fcs=(), vec_fcs=()) -> list[HeadPlan]:
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
        plans.append(_plan_head(idx, namer, head, kernel_cache, dh, shapes,
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
    from .dense import plan_trunk_reshape

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


def _plan_head(idx: GraphIndex, namer: Namer, head: Head, kernel_cache: dict, dh=None, shapes=None,
               fold: bool = False, pin: bool = False) -> HeadPlan:
    """Keep mode: new tensors get fresh names and one Flatten writes the
    head's last original tensor. Dense mode (``dh``): the new nodes write
    the original tensor names, which now hold maps, through to the outputs."""
    col = head.collapse
    spatial = head.spatial_rank
    nodes: list[onnx.NodeProto] = []
    inits: list[tuple[str, np.ndarray]] = []
    removed = set()
    x = col.source
    if dh is not None and dh.pool is not None:
        out = namer(f"{x}_map") if col.unsqueeze else x
        attrs = {"kernel_shape": list(dh.window), "strides": [1] * len(dh.window)}
        if dh.pool.domain == "com.microsoft":  # QLinearGlobalAveragePool: its scales, zero points and domain
            attrs["domain"] = dh.pool.domain
        nodes.append(helper.make_node(dh.pool_op, [dh.source] + list(dh.pool.input[1:] if "domain" in attrs else []),
                                      [out], name=dh.pool.name or namer("window_pool"), **attrs))
        removed.add(node_key(dh.pool))
        x = out
    elif col.unsqueeze:
        out = namer(f"{x}_map")
        axes = list(range(2, 2 + col.unsqueeze))
        if idx.opset >= 13:
            axes_name = namer(f"{x}_map_axes")
            inits.append((axes_name, np.array(axes, dtype=np.int64)))
            nodes.append(helper.make_node("Unsqueeze", [x, axes_name], [out], name=namer(f"{x}_unsqueeze")))
        else:
            nodes.append(helper.make_node("Unsqueeze", [x], [out], name=namer(f"{x}_unsqueeze"), axes=axes))
        x = out
    for pool, pool_op in (dh.segment_pools if dh is not None else ()):
        # the pool's output becomes a map; the per-position ops after it stay
        nodes.append(helper.make_node(pool_op, [pool.input[0]], [pool.output[0]], name=pool.name or namer("window_pool"),
                                      kernel_shape=list(dh.window), strides=[1] * len(dh.window)))
        removed.add(node_key(pool))
    for view in (dh.segment_views if dh is not None else ()):  # Gather(Reshape(x, [-1]), arange) -> x
        nodes.append(helper.make_node("Identity", [idx.producer[view.input[0]].input[0]], [view.output[0]],
                                      name=view.name or namer("view")))
        removed.add(node_key(view))
    for step in col.steps:  # per position: the same on the map as on the flattened vector
        out = namer(f"{step.node.output[0]}_map")
        new_nodes, new_inits = emit(step, x, out, namer, spatial, idx.opset, dense=dh is not None)
        nodes.extend(new_nodes)
        inits.extend(new_inits)
        x = out if new_nodes else x
    if fold:
        c, sizes = col.feature_shape[0], col.feature_shape[1:]
        t1, t2, shape = namer(f"{x}_cn"), namer(f"{x}_batch_folded"), namer(f"{x}_fold_shape")
        nodes.append(helper.make_node("Transpose", [x], [t1], name=namer(f"{x}_to_cn"),
                                      perm=[1, 0] + list(range(2, 2 + spatial))))
        inits.append((shape, np.array([1, c, -1] + list(sizes[1:]), dtype=np.int64)))
        nodes.append(helper.make_node("Reshape", [t1, shape], [t2], name=namer(f"{x}_fold")))
        x = t2
    first_conv = True
    retyped = []
    keys = {fc.output: (key, fshape, perm) for fc, key, fshape, perm in _kernel_keys(head)}
    for item in head.items:
        if isinstance(item, FC):
            key, fshape, perm = keys[item.output]
            if item.quant is not None:  # integer kernel and its quantized op (quant.py)
                from . import quant

                out = item.output if dh is not None else namer(f"{item.output}_conv")
                strides = [int(fshape[1])] + [1] * (spatial - 1) if fold and first_conv else None
                new_nodes, new_inits = quant.emit(item, x, out, idx, namer, kernel_cache, fshape, perm, strides,
                                                  dense=dh is not None)
                nodes.extend(new_nodes)
                inits.extend(new_inits)
                first_conv, x = False, out
                continue
            if kernel_cache.get(key) == item.weight:
                retyped.append((item.weight, (item.m,) + tuple(fshape)))
            elif key not in kernel_cache:
                w = idx.value(item.weight)
                kernel = kernels.conv_kernel(kernels.fc_matrix(w, trans_b=item.trans_b, alpha=item.alpha), fshape,
                                             perm)
                kernel_cache[key] = namer(f"{item.weight}_conv")
                inits.append((kernel_cache[key], kernel))
            conv_inputs = [x, kernel_cache[key]]
            if item.bias is not None:
                b = kernels.fc_bias(idx.value(item.bias), item.m, beta=item.beta)
                if b is not None:
                    bname = namer(f"{item.bias}_conv")
                    inits.append((bname, b.astype(helper.tensor_dtype_to_np_dtype(
                        idx.elem_type(item.weight)), copy=False)))
                    conv_inputs.append(bname)
            out = item.output if dh is not None else namer(f"{item.output}_conv")
            attrs = {"kernel_shape": list(fshape[1:])}
            if fold and first_conv:
                attrs["strides"] = [int(fshape[1])] + [1] * (spatial - 1)
            first_conv = False
            nodes.append(helper.make_node("Conv", conv_inputs, [out], name=item.nodes[0].name or namer(item.name),
                                          **attrs))
            x = out
        else:
            out = item.node.output[0] if dh is not None else namer(f"{item.node.output[0]}_conv")
            new_nodes, new_inits = emit(item, x, out, namer, spatial, idx.opset, dense=dh is not None)
            nodes.extend(new_nodes)
            inits.extend(new_inits)
            if new_nodes:
                x = out
    if dh is None:
        if fold:  # [1, M, N, 1...] -> [N, M, 1, 1...]
            t = namer(f"{head.end}_unfolded")
            nodes.append(helper.make_node("Transpose", [x], [t], name=namer(f"{head.end}_unfold"),
                                          perm=[2, 1, 0] + list(range(3, 2 + spatial))))
            x = t
        if pin:
            shape = namer(f"{head.end}_features")
            inits.append((shape, np.array([0, head.fcs[-1].m], dtype=np.int64)))
            nodes.append(helper.make_node("Reshape", [x, shape], [head.end], name=namer(f"{head.end}_flatten")))
        else:
            nodes.append(helper.make_node("Flatten", [x], [head.end], name=namer(f"{head.end}_flatten"), axis=1))
    else:
        for step in dh.tail:
            new_nodes, new_inits = emit(step, step.node.input[step.data_index], step.node.output[0], namer, spatial,
                                        idx.opset, dense=True, suffix="_dense")
            nodes.extend(new_nodes)
            inits.extend(new_inits)
            removed.add(node_key(step.node))
    for item in head.items:
        removed.update(node_key(n) for n in item_nodes(item))
    anchor = node_key(item_nodes(head.items[0])[0])
    return HeadPlan(anchor, tuple(nodes), tuple(inits), frozenset(removed), tuple(retyped))


