"""graph.py: constant folding evaluates each node as the model's opset defines it."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fc2conv.graph import GraphIndex


def _model(node, opset, inits):
    g = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT,
                                                                             None)],
                          [numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_squeeze_of_an_old_opset_reads_its_axes_attribute():
    """Squeeze-11 takes axes as an attribute; the newest Squeeze would squeeze every 1."""
    x = np.zeros((1, 3, 1), np.float32)
    v = GraphIndex(_model(helper.make_node("Squeeze", ["x"], ["y"], axes=[0]), 11, {"x": x})).value("y")
    assert v.shape == (3, 1)


@pytest.mark.parametrize("opset", [11, 17])
def test_a_folded_reduce_follows_its_opset(opset):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    if opset < 13:
        node = helper.make_node("ReduceSum", ["x"], ["y"], axes=[1], keepdims=0)
        inits = {"x": x}
    else:
        node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)
        inits = {"x": x, "axes": np.array([1], np.int64)}
    np.testing.assert_array_equal(GraphIndex(_model(node, opset, inits)).value("y"), x.sum(axis=1))


def test_an_op_the_reference_runtime_rejects_is_not_a_constant():
    x = np.zeros((2, 3), np.float32)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    assert GraphIndex(_model(node, 17, {"x": x, "shape": np.array([4, 4], np.int64)})).value("y") is None
