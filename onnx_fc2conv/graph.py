"""A read-only index over an ONNX graph: who produces and who consumes each
tensor, which tensors are constant, and their values (folding small constant
expressions such as a Reshape or Transpose of an initializer).

Nothing here mutates the graph.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ops import DEFAULT_DOMAINS, FOLDABLE, attr, is_default  # noqa: F401 (attr, is_default: read as graph.*)

# Constant expressions larger than this many nodes are not evaluated.
_MAX_FOLD_NODES = 64


def node_label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def node_key(node: onnx.NodeProto) -> str:
    """A node's identity that survives copies (unlike ``id()`` of a protobuf
    wrapper): its first output's name (outputs are unique in a graph), else
    its name."""
    return next((o for o in node.output if o), node.name)


def subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names that nodes of nested subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                for n in sub.node:
                    names.update(n.input)
                names |= subgraph_inputs(sub)
    names.discard("")
    return names


class GraphIndex:
    """Producers, consumers and constant values of one graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.graph = graph
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.position: dict[str, int] = {}   # node_key -> index in graph.node
        for i, node in enumerate(graph.node):
            self.position[node_key(node)] = i
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.sub_reads = subgraph_inputs(graph)
        self._values: dict[str, np.ndarray | None] = {}

    # -- structure ---------------------------------------------------------
    def pos(self, node: onnx.NodeProto) -> int:
        """The node's index in graph.node."""
        return self.position[node_key(node)]

    def uses(self, name: str) -> int:
        """How many places read a tensor (nodes, graph outputs, subgraphs)."""
        return len(self.consumers.get(name, ())) + (name in self.outputs) + (name in self.sub_reads)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        if self.uses(name) != 1:
            return None
        cons = self.consumers.get(name, ())
        return cons[0] if cons else None

    # -- constants ---------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return self.value(name) is not None

    def const_shape(self, name: str) -> tuple | None:
        """A constant's shape without reading its data where possible."""
        t = self.initializers.get(name)
        if t is not None:
            return tuple(int(d) for d in t.dims)
        v = self.value(name)
        return None if v is None else tuple(v.shape)

    def elem_type(self, name: str) -> int:
        """A constant's ONNX element type (without reading an initializer's data)."""
        t = self.initializers.get(name)
        if t is not None:
            return t.data_type
        v = self.value(name)
        return 0 if v is None else helper.np_dtype_to_tensor_dtype(v.dtype)

    def value(self, name: str) -> np.ndarray | None:
        """The tensor's constant value, or None when it is not a constant.

        One call evaluates at most ``_MAX_FOLD_NODES`` nodes (values found
        by earlier calls are free); a larger constant expression counts as
        not constant. The walk keeps its own stack, so a deep chain costs
        the budget, never the recursion limit.
        """
        if not name:
            return None
        if name in self._values:
            return self._values[name]
        budget = _Budget(_MAX_FOLD_NODES)
        stack = [name]  # each entry waits for the value of the one above it
        while stack:
            cur = stack[-1]
            if cur in self._values:
                stack.pop()
                continue
            step = self._compute(cur, budget)
            if step is _OVER_BUDGET:
                self._values[name] = None  # what was evaluated stays known; the rest is not a constant
                return None
            if isinstance(step, _Need):
                if step.name in stack:  # a cycle (an invalid graph): not a constant
                    self._values[cur] = None
                else:
                    stack.append(step.name)
                continue
            self._values[cur] = step
            stack.pop()
        return self._values[name]

    def _compute(self, name: str, budget: _Budget):
        """One step of ``value`` for a tensor whose inputs may not be known
        yet: its value, None (not a constant), ``_Need(input)`` (the next
        input to work out first, in order, so the first input that is not a
        constant ends the work) or ``_OVER_BUDGET``."""
        if name in self.initializers:
            return tensor_value(self.initializers[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and is_default(node):
            return _constant_node_value(node)
        if not is_default(node) or node.op_type not in FOLDABLE:
            return None
        if node.op_type in ("Shape", "Size"):
            return None  # handled by shape evaluation, not constant folding
        if not budget.charge(name):
            return _OVER_BUDGET
        feeds = {}
        for inp in node.input:
            if not inp:
                continue
            if inp not in self._values:
                return _Need(inp)
            v = self._values[inp]
            if v is None:
                return None
            feeds[inp] = v
        try:
            outs = run_node(node, feeds, self.opset)
        except Exception:  # an expression the reference runtime rejects is not ours to fold
            return None
        for out_name, out_val in zip(node.output, outs):
            if out_name and out_name != name:
                self._values.setdefault(out_name, out_val)
        return outs[list(node.output).index(name)]


class _Budget:
    """How many more nodes one ``GraphIndex.value`` call may evaluate; a
    node is charged once however often its step is retried."""

    def __init__(self, nodes: int):
        self.left = nodes
        self.charged: set[str] = set()

    def charge(self, name: str) -> bool:
        if name in self.charged:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        self.charged.add(name)
        return True


class _Need:
    """A step of ``GraphIndex.value`` waits for the value of ``name``."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


_OVER_BUDGET = object()


def tensor_value(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's data, refusing data that does not match its dims (an
    untrusted file may declare any dims) before numpy allocates anything."""
    from .errors import Fc2ConvError
    from .extdata import declared_bytes, external_bytes

    if any(d < 0 for d in t.dims):
        raise Fc2ConvError(f"tensor {t.name!r} has a negative dim {list(t.dims)}")
    need = declared_bytes(t)
    if need is None:
        raise Fc2ConvError(f"tensor {t.name!r} has an unknown data type {t.data_type}")
    if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL:
        data = external_bytes(t)
        inline = onnx.TensorProto()
        inline.name, inline.data_type = t.name, t.data_type
        inline.dims.extend(t.dims)
        inline.raw_data = data
        t = inline
    if t.HasField("raw_data") and len(t.raw_data) != need:
        raise Fc2ConvError(f"tensor {t.name!r} declares dims {list(t.dims)} ({need} bytes) but holds "
                           f"{len(t.raw_data)} bytes")
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:  # malformed tensor data in the file
        raise Fc2ConvError(f"tensor {t.name!r} cannot be read: {str(exc).splitlines()[0]}") from None


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return tensor_value(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def run_node(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    """Evaluate one node with onnx's reference implementation of its op at
    the model's opset (``ReferenceEvaluator(node)`` would take the newest
    opset's: Squeeze-11 reads its axes from an attribute, Squeeze-13 from an
    input). No model is built around the node: that cost twice the time."""
    op = _reference_op(node.op_type, opset)(node, _RUN_PARAMS | {"opsets": {"": opset}})
    outs = op.run(*[feeds[i] if i else None for i in node.input])
    return [np.asarray(o) for o in outs]


@functools.lru_cache(maxsize=None)
def _reference_op(op_type: str, opset: int):
    from onnx.reference.ops import load_op

    return load_op("", op_type, opset)


_RUN_PARAMS = {"log": lambda *args: None, "verbose": 0, "new_ops": None}


def run_nodes(nodes: Iterable[onnx.NodeProto], feeds: dict[str, np.ndarray], want: str,
              opset: int) -> np.ndarray:
    """Evaluate a small subgraph (nodes in topological order) for one tensor."""
    from onnx.reference import ReferenceEvaluator

    nodes = list(nodes)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]
    graph = helper.make_graph(nodes, "expr", inputs, [helper.make_empty_tensor_value_info(want)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(model).run([want], feeds)[0])
