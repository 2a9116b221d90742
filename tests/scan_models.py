"""Small models and the one-pass reference for the scan tests.

``dense_model`` is fully convolutional already (used by scan as it is), with
every border effect a tiling can get wrong: a strided Conv with
``auto_pad=SAME_UPPER`` (its padding depends on the size), a ceil-mode
MaxPool with padding (partial windows at the end), an AveragePool that does
not count its padding, and asymmetric explicit pads. ``classifier`` has FC
layers on a padded trunk with a ceil-mode pool (scan makes it dense).
``se_classifier`` keeps a squeeze-excitation pool (scan must refuse it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as TP, helper, numpy_helper

from onnx_fc2conv.scanning import engine, model as model_mod


def _k(rank, v):
    return [v] * rank


def dense_model(rank: int = 2, channels: int = 2, seed: int = 0, nhwc: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = lambda *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32),  # noqa: E731
                                               f"w{len(inits)}")
    inits = []
    inits.append(w(4, channels, *_k(rank, 3)))
    inits.append(w(5, 4, *_k(rank, 2)))
    inits.append(w(3, 5, *_k(rank, 1)))
    k = lambda v: _k(rank, v)  # noqa: E731
    first = "x"
    pre = []
    if nhwc:   # channels last, as tf2onnx writes Keras models: a Transpose to NCHW first
        pre = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, rank + 1] + list(range(1, rank + 1)))]
        first = "xt"
    nodes = pre + [
             helper.make_node("Conv", [first, "w0"], ["a"], kernel_shape=k(3), strides=k(2), auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MaxPool", ["b"], ["c"], kernel_shape=k(3), strides=k(2), pads=k(1) * 2, ceil_mode=1),
             helper.make_node("AveragePool", ["c"], ["d"], kernel_shape=k(3), strides=k(1), pads=k(1) * 2,
                              count_include_pad=0),
             helper.make_node("Conv", ["d", "w1"], ["e"], kernel_shape=k(2), pads=k(0) + k(1)),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("Conv", ["f", "w2"], ["y"], kernel_shape=k(1))]
    spatial = [f"s{i}" for i in range(rank)]
    dims = [1] + spatial + [channels] if nhwc else [1, channels] + spatial
    g = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TP.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TP.FLOAT, [1, 3] + [f"m{i}" for i in range(rank)])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def classifier(native: int = 9, channels: int = 1, se: bool = False, seed: int = 1) -> onnx.ModelProto:
    """Conv 3x3 pad 1 -> Relu -> MaxPool 2 s2 ceil -> Conv 3x3 -> Relu [-> SE] -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(seed)
    inits = {}

    def w(name, *shape):
        inits[name] = numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)
        return name

    after_pool = -(-native // 2)
    side = after_pool - 2
    nodes = [helper.make_node("Conv", ["x", w("w1", 4, channels, 3, 3)], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MaxPool", ["b"], ["c"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("Conv", ["c", w("w2", 6, 4, 3, 3)], ["d"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["d"], ["e"])]
    last = "e"
    if se:
        nodes += [helper.make_node("GlobalAveragePool", ["e"], ["gp"], name="se_pool"),
                  helper.make_node("Sigmoid", ["gp"], ["gs"]),
                  helper.make_node("Mul", ["e", "gs"], ["se"])]
        last = "se"
    nodes += [helper.make_node("Flatten", [last], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", w("fc", 5, 6 * side * side), w("fb", 5)], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    g = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TP.FLOAT, [1, channels, native, native])],
                          [helper.make_tensor_value_info("prob", TP.FLOAT, [1, 5])], list(inits.values()))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def one_pass(model, pixels: np.ndarray, scale=1 / 255, mean=None, std=None, dense_stride=None) -> dict:
    """The dense model run once on the whole image: output -> [classes, *map]."""
    dense = model_mod.prepare(model, dense_stride=dense_stride)
    c = dense.channels
    prep = model_mod.Preprocessing(scale, tuple(mean or (0.0,) * c), tuple(std or (1.0,) * c))
    px = pixels if pixels.ndim == dense.rank + 1 else pixels[..., None]
    sess = engine.session(dense.data, "cpu", 1)
    outs = sess.run(list(dense.outputs), {dense.input: model_mod.to_input(px, dense, prep)})
    return {o: y[0] for o, y in zip(dense.outputs, outs)}


def assert_exact(got: np.ndarray, ref: np.ndarray, what: str = "") -> float:
    """The contract: |d| <= 1e-5 * max|ref|, same shape, no NaN. Returns |d| / max|ref|."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert not np.isnan(got).any(), f"{what}: positions never written"
    scale = float(np.abs(ref).max())
    d = float(np.abs(got.astype(np.float64) - ref).max())
    assert d <= 1e-5 * scale, f"{what}: max |d| {d} > 1e-5 x {scale}"
    return d / scale if scale else 0.0
