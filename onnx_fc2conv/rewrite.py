"""Apply head plans to a model, in place: swap the FC nodes for the planned
Conv nodes, reuse each head's last original tensor name for the final Flatten
(so outputs and downstream consumers keep their names), then drop what the
change orphaned and put the nodes back in topological order.
"""

from __future__ import annotations

import heapq

import onnx
from onnx import helper, numpy_helper

from . import shapes as shapes_mod
from .graph import node_key, subgraph_inputs
from .plan import HeadPlan, SignaturePlan


def _reads(graph: onnx.GraphProto) -> set[str]:
    names = {o.name for o in graph.output} | subgraph_inputs(graph)
    for n in graph.node:
        names.update(n.input)
    names.discard("")
    return names


def apply(model: onnx.ModelProto, plans: list[HeadPlan], signature: SignaturePlan | None = None) -> None:
    """Swap in the planned nodes, then (dense mode) the planned signature."""
    if plans:
        _apply_nodes(model, plans)
    if signature is not None:
        _apply_signature(model, signature)


def _apply_nodes(model: onnx.ModelProto, plans: list[HeadPlan]) -> None:
    graph = model.graph
    read_before = _reads(graph)
    anchors = {p.anchor: p for p in plans}
    removed = set().union(*(p.removed for p in plans))
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        key = node_key(node)
        plan = anchors.get(key)
        if plan is not None:
            new_nodes.extend(plan.nodes)
        if key not in removed:
            new_nodes.append(node)
    _replace_nodes(graph, new_nodes)
    by_name = {t.name: t for t in graph.initializer}
    listed = {i.name: i for i in graph.input}
    for plan in plans:
        for name, dims in plan.retyped:
            tensor = by_name[name]
            if list(tensor.dims) != list(dims):
                del tensor.dims[:]
                tensor.dims.extend(dims)
                if name in listed:  # IR < 4: the initializer's input listing follows
                    shape = listed[name].type.tensor_type.shape
                    del shape.dim[:]
                    for d in dims:
                        shape.dim.add().dim_value = d
    legacy = model.ir_version < 4  # IR < 4: every initializer is also a graph input
    for plan in plans:
        for name, value in plan.initializers:
            tensor = numpy_helper.from_array(value, name)
            graph.initializer.append(tensor)
            if legacy:
                graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    _prune(graph, read_before, legacy)
    _toposort(graph)
    written = {o for p in plans for n in p.nodes for o in n.output} | {n for p in plans for n, _ in p.initializers}
    retyped = {n for p in plans for n, _ in p.retyped}
    _drop_stale_value_info(graph, written | retyped)


def _apply_signature(model: onnx.ModelProto, sig: SignaturePlan) -> None:
    """Symbolic input dims, value_info replaced, the outputs' shapes inferred
    afresh (else their old leading dims followed by unknown spatial ones)."""
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    for name, axis, param in sig.symbolic:
        dim = inputs[name].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = param
    del graph.value_info[:]
    for name, elem, dims in sig.value_info:
        graph.value_info.append(helper.make_tensor_value_info(name, elem, list(dims)))
    outputs = set(sig.outputs)
    spatial = len(sig.spatial_names)
    before = {}
    for o in graph.output:
        if o.name in outputs:
            before[o.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in o.type.tensor_type.shape.dim]
            o.type.tensor_type.ClearField("shape")
    infos = shapes_mod.infer(model)
    for o in graph.output:
        if o.name not in outputs:
            continue
        info = infos.get(o.name)
        # What inference found, else the original dims followed by the map's
        # (an output of a channel-shuffled trunk may defeat inference).
        dims = list(info.shape) if info is not None and info.shape is not None else \
            before[o.name] + [None] * spatial
        shape = o.type.tensor_type.shape
        for i, d in enumerate(dims):
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str) and d and not d.startswith("unk__"):
                dim.dim_param = d
            elif i >= len(dims) - spatial:
                dim.dim_param = f"{o.name}_{sig.spatial_names[i - (len(dims) - spatial)]}"


def _drop_stale_value_info(graph: onnx.GraphProto, rewritten: set[str]) -> None:
    """graph.value_info may annotate any tensor, weights included (PyTorch's
    dynamo exporter does): an entry for a tensor the rewrite wrote or
    re-dimensioned, or for one that no longer exists, would contradict shape
    inference, which strict consumers (onnx's full check, tract) reject. Those
    entries go; annotations of untouched tensors stay."""
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} \
        | {t.name for t in graph.initializer}
    keep_vi = [v for v in graph.value_info if v.name in produced and v.name not in rewritten]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    # A repeated field owns its messages: copy them out before clearing it.
    detached = []
    for n in nodes:
        d = onnx.NodeProto()
        d.CopyFrom(n)
        detached.append(d)
    del graph.node[:]
    graph.node.extend(detached)


def _prune(graph: onnx.GraphProto, read_before: set[str], legacy: bool) -> None:
    """Remove nodes and initializers that the rewrite left unread (and only
    those: anything unread before stays). An initializer that is also a graph
    input is an input the user may feed, so it stays, except under IR < 4,
    where every initializer is listed as an input and the pair goes."""
    while True:
        reads = _reads(graph)
        dead = [i for i, n in enumerate(graph.node)
                if not any(o in reads for o in n.output if o) and any(o in read_before for o in n.output if o)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    reads = _reads(graph)
    inputs = set() if legacy else {i.name for i in graph.input}
    drop = {t.name for t in graph.initializer
            if t.name not in reads and t.name not in inputs and t.name in read_before}
    if drop:
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name in drop:
                del graph.initializer[i]
        if legacy:
            for i in reversed(range(len(graph.input))):
                if graph.input[i].name in drop:
                    del graph.input[i]


def _toposort(graph: onnx.GraphProto) -> None:
    """Stable topological sort (Kahn, by original position)."""
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    deps = []
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, n in enumerate(nodes):
        d = {producer[x] for x in n.input if x not in available and x in producer and producer[x] != i}
        deps.append(len(d))
        for j in d:
            users[j].append(i)
    ready = [i for i, d in enumerate(deps) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            deps[u] -= 1
            if deps[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes) or order == list(range(len(nodes))):
        return  # already sorted, or a cycle: leave as is
    detached = []
    for i in order:
        d = onnx.NodeProto()
        d.CopyFrom(nodes[i])
        detached.append(d)
    del graph.node[:]
    graph.node.extend(detached)
