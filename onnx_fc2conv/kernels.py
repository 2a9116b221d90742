"""Weight arithmetic of the FC -> Conv rewrite, as pure numpy functions.

An FC layer computes ``Y = alpha * A @ B' + beta * C`` (ONNX Gemm; ``B' = B``
or ``B.T`` by ``transB``; MatMul + Add is the case alpha = beta = 1). Writing
its weight with one row per output feature, ``W = alpha * B'.T`` of shape
``[M, K]``, the first FC of a head reads ``A = flatten(transpose(F, perm))``
where ``F`` is the feature map ``[N, C, *S]`` and ``perm`` the axis order the
exporter flattened in (identity for NCHW, ``(0, 2, 3, 1)`` for NHWC). With
``T = transpose(F, perm)`` and ``k = W.reshape(M, *T.shape[1:])``:

    kernel[m, c, s...] = k.transpose(0, inv[1], ..., inv[r-1])[m, c, s...]
    e.g. NCHW: kernel[m, c, h, w] = alpha * B'[c*H*W + h*W + w, m]
         NHWC: kernel[m, c, h, w] = alpha * B'[h*W*C + w*C + c, m]

where ``inv = argsort(perm)``. A Conv with that kernel, no padding, stride 1,
over ``F`` gives ``[N, M, 1, ...]`` whose values are ``Y``. The bias is
``beta * C`` broadcast to ``[M]`` (C may be ``[M]``, ``[1, M]``, ``[1]``,
scalar). Later FCs see ``[N, M_prev, 1, ...]`` and are 1x1 Convs: the same
formula with an all-ones spatial shape. Position-wise constants ``k`` of an
Add/Mul/... on ``[N, M]`` become ``[M, 1, ...]`` so they broadcast the same way
over the Conv layout.

Weights keep their dtype; when alpha != 1 the product is computed in at least
float32 and rounded once. With transB = 1, alpha = 1 and an identity perm the
kernel is a reshape: a view of the original bytes, nothing is copied.
"""

from __future__ import annotations

import numpy as np


class NotPerFeature(ValueError):
    """A constant that varies along the batch axis: the FC is not a Conv."""


def _scaled(x: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return x
    work = np.promote_types(x.dtype, np.float32) if x.dtype.itemsize < 4 else x.dtype
    return (x.astype(work) * factor).astype(x.dtype)


def fc_matrix(b: np.ndarray, *, trans_b: bool, alpha: float = 1.0) -> np.ndarray:
    """The FC weight as ``[M, K]`` (one row per output feature), alpha folded in."""
    if b.ndim != 2:
        raise ValueError(f"FC weight must be 2-D, got shape {list(b.shape)}")
    w = b if trans_b else b.T
    return _scaled(w, alpha)


def conv_kernel(w: np.ndarray, feature_shape: tuple[int, ...], perm: tuple[int, ...] | None = None) -> np.ndarray:
    """Reshape an FC matrix ``[M, K]`` into a Conv kernel ``[M, C, *S]``.

    Args:
        w: FC weight, one row per output feature (see :func:`fc_matrix`).
        feature_shape: ``(C, *S)``, the feature map without its batch axis,
            in the map's own axis order.
        perm: the transpose the model applied to the map (batch axis
            included, ``perm[0] == 0``) before flattening; None for identity.
    """
    m, k = w.shape
    rank = len(feature_shape) + 1
    perm = tuple(range(rank)) if perm is None else tuple(perm)
    if len(perm) != rank or perm[0] != 0 or sorted(perm) != list(range(rank)):
        raise ValueError(f"perm {perm} is not a batch-preserving permutation of rank {rank}")
    if int(np.prod(feature_shape)) != k:
        raise ValueError(f"FC input size {k} != prod{tuple(feature_shape)}")
    full = (1,) + tuple(feature_shape)
    transposed = tuple(full[p] for p in perm[1:])
    kernel = w.reshape((m,) + transposed)
    if perm != tuple(range(rank)):
        inv = np.argsort(perm)
        kernel = kernel.transpose([0] + [int(inv[j]) for j in range(1, rank)])
    return kernel


def fc_bias(c: np.ndarray | None, m: int, *, beta: float = 1.0) -> np.ndarray | None:
    """``beta * C`` as a ``[M]`` vector, or None when there is no bias.

    Raises:
        NotPerFeature: when C is not broadcastable to ``[1, M]`` (it varies
            along the batch axis or has the wrong length).
    """
    if c is None or beta == 0.0:
        return None
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
        raise NotPerFeature(f"bias of shape {list(c.shape)} varies along the batch axis")
    flat = c.reshape(-1) if c.ndim else c.reshape(1)
    if flat.shape[0] not in (1, m):
        raise NotPerFeature(f"bias of shape {list(c.shape)} does not broadcast to {m} features")
    return np.ascontiguousarray(np.broadcast_to(_scaled(flat, beta), (m,)))


def per_feature(value: np.ndarray, m: int, spatial_rank: int) -> np.ndarray:
    """Reshape a constant that broadcasts against ``[N, M]`` so it broadcasts
    the same way against ``[N, M, 1, ...]`` (``spatial_rank`` ones).

    Scalars and one-element constants of rank <= 1 are returned unchanged.

    Raises:
        NotPerFeature: when the constant varies along the batch axis or has
            a length other than 1 or M on the feature axis.
    """
    if value.ndim > 2 or (value.ndim == 2 and value.shape[0] != 1):
        raise NotPerFeature(f"constant of shape {list(value.shape)} varies along the batch axis")
    if value.ndim == 0 or (value.ndim == 1 and value.shape[0] == 1):
        return value
    flat = value.reshape(-1)
    if flat.shape[0] not in (1, m):
        raise NotPerFeature(f"constant of shape {list(value.shape)} does not broadcast to {m} features")
    return flat.reshape((flat.shape[0],) + (1,) * spatial_rank)
