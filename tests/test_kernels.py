"""The weight arithmetic, against onnx.reference's Gemm, with no graph."""

import itertools

import numpy as np
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnx_fc2conv import kernels


def reference_gemm(a, b, c, trans_b, alpha, beta):
    node = helper.make_node("Gemm", ["A", "B"] + (["C"] if c is not None else []), ["Y"],
                            transB=int(trans_b), alpha=alpha, beta=beta)
    feeds = {"A": a, "B": b}
    if c is not None:
        feeds["C"] = c
    return ReferenceEvaluator(node).run(None, feeds)[0]


def conv_full(f, kernel, bias):
    """A Conv whose kernel covers the whole map: one output position."""
    out = np.tensordot(f, kernel, axes=(list(range(1, f.ndim)), list(range(1, kernel.ndim))))
    return out if bias is None else out + bias


BIASES = {"M": lambda m: (m,), "1xM": lambda m: (1, m), "1": lambda m: (1,), "scalar": lambda m: (), "none": None}


@pytest.mark.parametrize("trans_b,alpha,beta,bias", list(itertools.product(
    [False, True], [1.0, 0.5, -2.0], [1.0, 0.25], list(BIASES))))
@pytest.mark.parametrize("feature_shape", [(3, 4, 5), (2, 7), (2, 3, 2, 4), (5, 1, 1)])
def test_kernel_matches_gemm(trans_b, alpha, beta, bias, feature_shape):
    rng = np.random.default_rng(1)
    n, m, k = 3, 6, int(np.prod(feature_shape))
    f = rng.standard_normal((n,) + feature_shape).astype(np.float32)
    b = rng.standard_normal((m, k) if trans_b else (k, m)).astype(np.float32)
    c = None if BIASES[bias] is None else rng.standard_normal(BIASES[bias](m)).astype(np.float32)
    want = reference_gemm(f.reshape(n, -1), b, c, trans_b, alpha, beta)
    kernel = kernels.conv_kernel(kernels.fc_matrix(b, trans_b=trans_b, alpha=alpha), feature_shape)
    assert kernel.shape == (m,) + feature_shape
    got = conv_full(f, kernel, kernels.fc_bias(c, m, beta=beta))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("perm", [(0, 2, 3, 1), (0, 3, 1, 2), (0, 2, 1, 3)])
def test_kernel_undoes_transpose_before_flatten(perm):
    """NHWC flatten (tf2onnx's Keras Flatten): the rows are permuted back."""
    rng = np.random.default_rng(2)
    f = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    w = rng.standard_normal((7, 60)).astype(np.float32)
    want = np.transpose(f, perm).reshape(2, -1) @ w.T
    got = conv_full(f, kernels.conv_kernel(w, f.shape[1:], perm), None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nchw_formula_by_index():
    """kernel[m, c, h, w] = W'[c*H*W + h*W + w, m] (transB=0)."""
    c_, h_, w_ = 2, 3, 4
    b = np.arange(c_ * h_ * w_ * 5, dtype=np.float32).reshape(c_ * h_ * w_, 5)
    kernel = kernels.conv_kernel(kernels.fc_matrix(b, trans_b=False), (c_, h_, w_))
    for m, c, h, w in itertools.product(range(5), range(c_), range(h_), range(w_)):
        assert kernel[m, c, h, w] == b[c * h_ * w_ + h * w_ + w, m]


def test_transb_alpha_one_is_a_view():
    b = np.ones((4, 12), dtype=np.float32)
    kernel = kernels.conv_kernel(kernels.fc_matrix(b, trans_b=True), (3, 2, 2))
    assert np.shares_memory(kernel, b)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtype_is_kept(dtype):
    b = np.ones((4, 6), dtype=dtype)
    assert kernels.fc_matrix(b, trans_b=True, alpha=0.5).dtype == dtype
    assert kernels.fc_bias(np.ones(4, dtype=dtype), 4, beta=3.0).dtype == dtype


@pytest.mark.parametrize("shape", [(2, 4), (4, 1, 1), (3,)])
def test_bias_that_is_not_per_feature_is_refused(shape):
    with pytest.raises(kernels.NotPerFeature):
        kernels.fc_bias(np.ones(shape, dtype=np.float32), 4)


def test_per_feature_constant_layout():
    v = np.arange(4, dtype=np.float32)
    assert kernels.per_feature(v, 4, 2).shape == (4, 1, 1)
    assert kernels.per_feature(v.reshape(1, 4), 4, 1).shape == (4, 1)
    assert kernels.per_feature(np.float32(2.0), 4, 2).shape == ()
    with pytest.raises(kernels.NotPerFeature):
        kernels.per_feature(np.ones((2, 4), dtype=np.float32), 4, 2)
