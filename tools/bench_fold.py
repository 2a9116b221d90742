"""Microseconds per folded constant node: GraphIndex.value over a chain of
constant nodes (Reshape/Transpose/Add/Cast/Concat/Gather of initializers),
every value computed afresh. Run: PYTHONPATH=$PWD python tools/bench_fold.py
"""

import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_fc2conv import graph


def chain(n: int, opset: int = 17):
    nodes, inits = [], [numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "t0"),
                        numpy_helper.from_array(np.array([4, 3], np.int64), "shape"),
                        numpy_helper.from_array(np.array([1], np.int64), "ind")]
    ops = [("Reshape", ["shape"], {}), ("Transpose", [], {"perm": [1, 0]}), ("Cast", [], {"to": TensorProto.FLOAT}),
           ("Add", ["t0"], {}), ("Gather", ["ind"], {"axis": 0}), ("Concat", [], {"axis": 0})]
    prev = "t0"
    for i in range(1, n + 1):
        op, extra, attrs = ops[(i - 1) % 4]
        ins = [prev] + extra
        nodes.append(helper.make_node(op, ins, [f"t{i}"], **attrs))
        prev = f"t{i}"
    g = helper.make_graph(nodes, "fold", [], [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), prev


def main(n: int = 60, rounds: int = 30) -> None:
    model, last = chain(n)
    graph.GraphIndex(model).value(last)  # warm imports and caches
    best = float("inf")
    for _ in range(rounds):
        idx = graph.GraphIndex(model)
        t = time.perf_counter()
        v = idx.value(last)
        best = min(best, time.perf_counter() - t)
    assert v is not None
    print(f"{best / n * 1e6:.1f} us per folded node ({n} nodes, best of {rounds})")


if __name__ == "__main__":
    main()
