"""Exact tiling of a dense score map: which input region each tile reads and
which map positions it owns. Pure integer arithmetic, no model.

Per spatial axis the dense model has stride ``s`` (the product of its layers'
strides; every layer's jump divides it), receptive field ``rf`` and offset
``off`` at the image's size ``N`` (``auto_pad=SAME`` makes the offset depend on
``N``), and the one-pass map has ``M`` positions. Position ``p`` depends on the
pixels (real or padded) of its *support*::

    support(p) = [off + p*s, off + p*s + rf)

**Why a crop computes the same numbers.** Run the model on the crop
``[a, b)`` of the image with ``a ≡ 0 (mod s)`` and, unless ``b = N``,
``N - b ≡ 0 (mod s)``. Every layer with input jump ``J`` and stride ``t``
(``J*t`` divides ``s``) then sees an input shorter than in one pass by a
multiple of ``t`` at each end, so its output grid is the one-pass grid shifted
by whole positions, floor/ceil rounding ends the same way, and an
``auto_pad=SAME`` layer (padding ``k_eff - t + ((-n) mod t)``) pads exactly as
in one pass. Local position ``q`` of the crop's map is global position
``p = q + a/s``. It holds the one-pass value when nothing the crop invented
reaches it: its support lies inside the crop, or runs past an edge of the
crop that is the image's own edge, where crop and image pad alike::

    valid(p; a, b) = (off + p*s >= a  or  a == 0)  and  (off + p*s + rf <= b  or  b == N)

The support is the union of the windows of every layer (the receptive-field
recursion of geometry.py), so it also bounds a ceil-mode pool's partial window,
an average pool's ``count_include_pad`` and the padding of every layer: a
position whose support stays off an artificial edge reads no padding and no
partial window there.

**The tiles.** Tile ``c`` owns the positions ``[c*K, min((c+1)*K, M))`` (one
chunk of the output) and reads, for its first owned position ``p0`` and last
``p1``::

    lo = off + p0*s,   hi = off + p1*s + rf
    a  = 0  if lo <= 0  else  s * floor(min(lo, N-1) / s)
    b  = N  if hi >= N  else  N - s * floor((N - max(hi, 1)) / s)

(the min and max matter only for positions wholly in the padding beyond the image)

so ``a <= lo`` and ``b >= hi``: every owned position is valid by construction.
The rounding adds at most ``s - 1`` pixels at each end, so a tile reads at most
``(K-1)*s + rf + 2*(s-1)`` pixels, and the largest ``K`` that keeps this within
``tile`` is::

    K = floor((tile - rf - 2*(s-1)) / s) + 1

A tile smaller than ``rf + 2*(s-1)`` cannot own a position with certainty and
is refused.

**Blocks.** A tile is read once, but the model may run on it in *blocks*: the
tile's owned positions cut into runs of ``k`` per axis, each run reading its
own ``read_region`` out of the tile's pixels. The same rule makes every
block's positions exact, and a block's region lies inside its tile's (both
ends of ``read_region`` grow with the positions). Blocks cost recomputed
halos, and buy a working set that stays in the caches: on this project's
2-core machine ``vgg_small`` runs 1.4x faster per pixel on 512-pixel inputs
than on 2048-pixel ones, ``lenet`` 1.5x on 256 against 2048
(one session, one thread). :func:`block_positions` picks the smallest block
whose recomputation stays within ``BLOCK_OVERHEAD`` (read area / owned area)
and that holds at least ``MIN_BLOCK_PIXELS``, and splits the tile evenly into
as many such blocks as fit; a tile that cannot hold two is one block. The
bound was set by scanning 8192^2 with vgg_small, best of 3 (two lanes):
tile 2048 whole 6.31 s, in 4x4 blocks (bound 1.36) 4.35 s, in 3x3 (1.25)
4.24 s; tile 1024 whole 4.45 s, in 2x2 blocks (1.36) 4.63 s, which 1.25
leaves whole.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import Fc2ConvError


@dataclass(frozen=True)
class AxisPlan:
    """The tiling of one spatial axis."""
    size: int          # N: image pixels
    stride: int        # s
    receptive_field: int
    offset: int        # at this image size
    positions: int     # M: one-pass map size
    per_tile: int      # K: map positions owned by one tile

    @property
    def tiles(self) -> int:
        return -(-self.positions // self.per_tile)

    def owned(self, c: int) -> tuple[int, int]:
        """Map positions ``[p0, p1)`` owned by tile ``c``."""
        return c * self.per_tile, min((c + 1) * self.per_tile, self.positions)

    def read(self, c: int) -> tuple[int, int]:
        """The input region ``[a, b)`` tile ``c`` reads."""
        p0, p1 = self.owned(c)
        return read_region(p0, p1 - 1, self.size, self.stride, self.receptive_field, self.offset)

    def blocks(self, c: int, k: int) -> list:
        """Tile ``c``'s blocks of ``k`` positions: ``[((p0, p1), (a, b)), ...]``,
        owned positions and the region each reads."""
        p0, p1 = self.owned(c)
        return [((q, min(q + k, p1)), read_region(q, min(q + k, p1) - 1, self.size, self.stride,
                                                  self.receptive_field, self.offset))
                for q in range(p0, p1, max(1, k))]

    def valid(self, p: int, a: int, b: int) -> bool:
        return valid(p, a, b, self.size, self.stride, self.receptive_field, self.offset)


def read_region(p0: int, p1: int, n: int, s: int, rf: int, off: int) -> tuple[int, int]:
    """``[a, b)`` for positions ``p0..p1`` (inclusive), aligned as the module docstring says."""
    lo, hi = off + p0 * s, off + p1 * s + rf
    a = 0 if lo <= 0 else s * (min(lo, n - 1) // s)
    b = n if hi >= n else n - s * ((n - max(hi, 1)) // s)
    return a, b


def valid(p: int, a: int, b: int, n: int, s: int, rf: int, off: int) -> bool:
    """Whether the crop ``[a, b)`` (aligned) computes position ``p`` as one pass does."""
    lo = off + p * s
    return (lo >= a or a == 0) and (lo + rf <= b or b == n)


def per_tile(tile: int, s: int, rf: int) -> int:
    """K: the positions one tile of ``tile`` pixels owns (0 when it cannot own one)."""
    return max(0, (tile - rf - 2 * (s - 1)) // s + 1)


def min_tile(s: int, rf: int) -> int:
    return rf + 2 * (s - 1)


BLOCK_OVERHEAD = 1.25          # the most a block's halo may add to the pixels run (area read / area owned)
MIN_BLOCK_PIXELS = 256 * 256   # smaller inputs pay onnxruntime's per-call cost


def block_positions(axes, overhead: float | None = None, min_pixels: int | None = None) -> tuple:
    """Positions per block per axis, dividing the tile's ``per_tile`` evenly:
    blocks no smaller than the smallest whose read area / owned area stays
    within ``overhead`` (split evenly over the axes) and that holds
    ``min_pixels`` pixels; a tile that cannot hold two such blocks along an
    axis is one block along it."""
    overhead = BLOCK_OVERHEAD if overhead is None else overhead
    min_pixels = MIN_BLOCK_PIXELS if min_pixels is None else min_pixels
    factor = overhead ** (1 / len(axes))
    ks = []
    for a in axes:
        halo = a.receptive_field + 2 * (a.stride - 1) - a.stride      # read minus owned pixels
        ks.append(min(a.per_tile, max(1, -(-int(halo / (factor - 1)) // a.stride))) if factor > 1
                  else a.per_tile)
    while _pixels(axes, ks) < min_pixels and any(k < a.per_tile for k, a in zip(ks, axes)):
        ks = [min(a.per_tile, k + max(1, k // 8)) for k, a in zip(ks, axes)]
    out = []
    for a, k in zip(axes, ks):
        n = max(1, a.per_tile // k)              # as many blocks as hold k positions each
        out.append(-(-a.per_tile // n))          # the tile split evenly among them
    return tuple(out)


def _pixels(axes, ks) -> int:
    n = 1
    for a, k in zip(axes, ks):
        n *= (k - 1) * a.stride + a.receptive_field + 2 * (a.stride - 1)
    return n


@dataclass(frozen=True)
class Tiling:
    """The tiling of every spatial axis; a tile is a tuple of per-axis indices."""
    axes: tuple   # AxisPlan per spatial axis
    tile: tuple   # the requested tile size per axis

    @property
    def grid(self) -> tuple:
        return tuple(a.tiles for a in self.axes)

    @property
    def chunks(self) -> tuple:
        return tuple(a.per_tile for a in self.axes)

    def __len__(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n

    def tiles(self):
        return itertools.product(*[range(g) for g in self.grid])

    def owned(self, t) -> tuple:
        return tuple(a.owned(c) for a, c in zip(self.axes, t))

    def read(self, t) -> tuple:
        return tuple(a.read(c) for a, c in zip(self.axes, t))

    def blocks(self, t, ks) -> list:
        """Tile ``t``'s blocks of ``ks`` positions per axis, as per-axis tuples
        ``(owned ranges, read regions)``."""
        per_axis = [a.blocks(c, k) for a, c, k in zip(self.axes, t, ks)]
        return [tuple(zip(*combo)) for combo in itertools.product(*per_axis)]

    def local(self, owned, regions) -> tuple:
        """Slices of the map of a crop reading ``regions`` that hold the
        positions ``owned`` (per axis: ``[p0, p1)`` and ``[a, b)``)."""
        return tuple(slice(p0 - a // ax.stride, p1 - a // ax.stride)
                     for ax, (p0, p1), (a, _) in zip(self.axes, owned, regions))


def plan(sizes, strides, receptive_fields, offsets, positions, tile) -> Tiling:
    """The tiling for an image of ``sizes`` and a map of ``positions`` (per axis).

    Raises Fc2ConvError when ``tile`` is too small to own a position exactly."""
    k = len(sizes)
    tiles = tuple(tile) if isinstance(tile, (tuple, list)) else (int(tile),) * k
    axes = []
    for n, s, rf, off, m, t in zip(sizes, strides, receptive_fields, offsets, positions, tiles):
        if m < 1:
            raise Fc2ConvError(f"the image ({'x'.join(map(str, sizes))} px) is smaller than the model's window "
                               f"({rf} px): the map has no position")
        kk = per_tile(t, s, rf)
        if kk < 1:
            raise Fc2ConvError(f"--tile {t} is too small to be exact: a tile must hold one window ({rf} px) plus "
                               f"the alignment to the stride ({s} px) at both ends; give --tile {min_tile(s, rf)} "
                               f"or more")
        axes.append(AxisPlan(int(n), int(s), int(rf), int(off), int(m), min(kk, int(m))))
    return Tiling(tuple(axes), tiles)
