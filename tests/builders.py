"""Small FC-head models for the equivalence grid, built with onnx.helper.

``head_model`` builds: x [batch, C, *S] -> Conv 1x1 (the trunk) -> collapse
-> FC1 (a Gemm/MatMul variant) -> chain ops -> FC2 (Gemm) -> y.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COLLAPSES = ["flatten", "reshape_0_-1", "reshape_-1_K", "reshape_1_-1", "reshape_N_K", "reshape_shape_chain",
             "reshape_input_initializer", "flatten_dropout"]
FCS = ["gemm_tb1", "gemm_tb0", "gemm_alpha_beta", "gemm_bias_1", "gemm_bias_scalar", "gemm_nobias",
       "gemm_constant_nodes", "matmul_add", "matmul_add_left", "matmul"]
CHAIN_OPS = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Dropout", "BatchNormalization", "AddScalar",
             "AddPerFeature", "MulScalar", "MulPerFeature", "SubPerFeatureLeft", "DivScalar", "PRelu", "Elu",
             "HardSigmoid"]


class _B:
    def __init__(self, dtype, seed):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes, self.inits, self.extra_inputs = [], [], []
        self.n = 0

    def name(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def const(self, value, base="c", as_node=False):
        name = self.name(base)
        arr = np.asarray(value)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def rand(self, shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _fc(b: _B, x, kind, k, m):
    scale = 1.0 / np.sqrt(k)
    if kind.startswith("gemm"):
        trans_b = kind != "gemm_tb0"
        w = b.rand((m, k) if trans_b else (k, m), scale)
        attrs = {"transB": int(trans_b)}
        bias_shape = {"gemm_bias_1": (1,), "gemm_bias_scalar": (), "gemm_alpha_beta": (1, m)}.get(kind, (m,))
        as_node = kind == "gemm_constant_nodes"
        inputs = [x, b.const(w, "w", as_node)]
        if kind != "gemm_nobias":
            inputs.append(b.const(b.rand(bias_shape), "b", as_node))
        if kind == "gemm_alpha_beta":
            attrs.update(alpha=0.5, beta=2.0)
        return b.op("Gemm", inputs, **attrs)
    w = b.const(b.rand((k, m), scale), "w")
    y = b.op("MatMul", [x, w])
    if kind == "matmul":
        return y
    bias = b.const(b.rand((m,)), "b")
    return b.op("Add", [bias, y] if kind == "matmul_add_left" else [y, bias])


def _chain_op(b: _B, x, kind, m):
    if kind in ("Relu", "Sigmoid", "Tanh", "Elu", "HardSigmoid"):
        return b.op(kind, [x])
    if kind == "LeakyRelu":
        return b.op(kind, [x], alpha=0.1)
    if kind == "Clip":
        return b.op("Clip", [x, b.const(np.array(-0.5, b.dtype)), b.const(np.array(0.7, b.dtype))])
    if kind == "Dropout":
        return b.op("Dropout", [x])
    if kind == "BatchNormalization":
        return b.op("BatchNormalization", [x, b.const(b.rand((m,))), b.const(b.rand((m,))),
                                           b.const(b.rand((m,))), b.const(np.abs(b.rand((m,))) + 0.5)])
    if kind == "AddScalar":
        return b.op("Add", [x, b.const(np.array(0.3, b.dtype))])
    if kind == "AddPerFeature":
        return b.op("Add", [x, b.const(b.rand((m,)))])
    if kind == "MulScalar":
        return b.op("Mul", [b.const(np.array([1.5], b.dtype)), x])
    if kind == "MulPerFeature":
        return b.op("Mul", [x, b.const(b.rand((1, m)))])
    if kind == "SubPerFeatureLeft":
        return b.op("Sub", [b.const(b.rand((m,))), x])
    if kind == "DivScalar":
        return b.op("Div", [x, b.const(np.array(2.0, b.dtype))])
    if kind == "PRelu":
        return b.op("PRelu", [x, b.const(b.rand((m,)))])
    raise ValueError(kind)


def head_model(feature_shape=(4, 3, 3), batch="N", collapse="flatten", fc="gemm_tb1", chain=("Relu",),
               dtype=np.float32, m1=6, m2=5, seed=0, opset=13, softmax=False) -> onnx.ModelProto:
    b = _B(dtype, seed)
    c = feature_shape[0]
    k = int(np.prod(feature_shape))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", elem, [batch, *feature_shape])
    ones = [1] * (len(feature_shape) - 1)
    if np.dtype(dtype) == np.float64:  # onnxruntime's CPU Conv has no double kernel
        f = b.op("Relu", ["x"])
    else:
        f = b.op("Conv", ["x", b.const(b.rand((c, c, *ones)))], kernel_shape=ones)
    ir = 8
    if collapse in ("flatten", "flatten_dropout"):
        flat = b.op("Flatten", [f], axis=1)
        if collapse == "flatten_dropout":
            flat = b.op("Dropout", [flat])
    elif collapse == "reshape_shape_chain":
        shape = b.op("Shape", [f])
        n = b.op("Gather", [shape, b.const(np.array(0, np.int64))], axis=0)
        n1 = b.op("Unsqueeze", [n, b.const(np.array([0], np.int64))])
        target = b.op("Concat", [n1, b.const(np.array([-1], np.int64))], axis=0)
        flat = b.op("Reshape", [f, target])
    elif collapse == "reshape_input_initializer":
        name = "flat_shape"
        b.inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), name))
        b.extra_inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, [2]))
        flat = b.op("Reshape", [f, name])
        ir = 3
    else:
        target = {"reshape_0_-1": [0, -1], "reshape_-1_K": [-1, k], "reshape_1_-1": [1, -1],
                  "reshape_N_K": [batch if isinstance(batch, int) else -1, k]}[collapse]
        flat = b.op("Reshape", [f, b.const(np.array(target, np.int64))])
    h = _fc(b, flat, fc, k, m1)
    for kind in chain:
        h = _chain_op(b, h, kind, m1)
    y = _fc(b, h, "gemm_tb1", m1, m2)
    if softmax:
        y = b.op("Softmax", [y], axis=1)
    out = helper.make_tensor_value_info(y, elem, [batch, m2])
    if ir == 3:  # IR < 4: every initializer is also a graph input
        b.extra_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits]
    graph = helper.make_graph(b.nodes, "head", [x] + b.extra_inputs, [out], b.inits)
    if ir == 3:
        opset = min(opset, 8)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(model)
    return model
