"""``scan --overview OUT.png``: the map over the image, small enough to look at.

The image is shrunk by an integer factor ``f = ceil(max(H, W) / MAX_SIDE)``
(block means, read region by region through the reader, never whole) and
drawn at ``zoom = 1/f``. The map is read from OUT a band of rows at a time;
where its cells would be under a pixel of the picture (``stride / f < 1``)
``g x g`` blocks of positions are merged: the block's mean probability,
drawn as one position of stride ``g*stride`` and receptive field
``rf + (g-1)*stride``, whose centre cell is exactly the union of the merged
positions' cells (heatmap.py's cell rule). Probabilities are the model's
output when it already gives them, otherwise the softmax over classes.
The picture itself is drawn by ``draw.picture``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import Fc2ConvError
from ..geometry import MapAxis
from . import store

MAX_SIDE = 2048
BAND = 256      # image rows (of the picture) or map rows read at once


def shrink(img, f: int) -> np.ndarray:
    """The image at 1/f (block means), uint8 for display (other dtypes stretched to their range)."""
    h, w = img.shape
    oh, ow = -(-h // f), -(-w // f)
    out = np.zeros((oh, ow, img.channels), np.float64)
    step = BAND * f      # image pixels per block side: a multiple of f, so blocks never straddle reads
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        for c0 in range(0, w, step):
            c1 = min(w, c0 + step)
            px = img.read(((r0, r1), (c0, c1))).astype(np.float64)
            ri, ci = np.arange(0, r1 - r0, f), np.arange(0, c1 - c0, f)
            s = np.add.reduceat(np.add.reduceat(px, ri, axis=0), ci, axis=1)
            cnt = np.outer(np.diff(np.append(ri, r1 - r0)), np.diff(np.append(ci, c1 - c0)))[..., None]
            out[r0 // f: r0 // f + len(ri), c0 // f: c0 // f + len(ci)] = s / cnt
    if img.dtype != np.uint8:
        lo, hi = np.percentile(out, 0.5), np.percentile(out, 99.5)
        out = (out - lo) / ((hi - lo) or 1.0) * 255.0
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if out.shape[2] == 4:
        out = out[..., :3]
    if out.shape[2] == 2:
        out = out[..., :1]
    return out if out.shape[2] != 1 else out[..., 0]


def merged_probabilities(arr, g: int) -> tuple[np.ndarray, bool]:
    """``[classes, M1/g, M2/g]`` mean probabilities of g x g blocks, read a band at a time."""
    from ..heatmap import probabilities

    c, m1, m2 = arr.shape
    out = np.zeros((c, -(-m1 // g), -(-m2 // g)), np.float64)
    band = max(g, (BAND // g) * g)
    source = None
    for r0 in range(0, m1, band):
        r1 = min(m1, r0 + band)
        block = np.asarray(arr[:, r0:r1, :], np.float64)
        missing = np.isnan(block).any(axis=0)
        if source is None:
            _, source = probabilities(np.nan_to_num(block))
        if source == "model output":
            p = np.nan_to_num(block)
        else:
            p = probabilities(np.nan_to_num(block))[0]
        p[:, missing] = 0.0
        ri, ci = np.arange(0, r1 - r0, g), np.arange(0, m2, g)
        s = np.add.reduceat(np.add.reduceat(p, ri, axis=1), ci, axis=2)
        cnt = np.outer(np.diff(np.append(ri, r1 - r0)), np.diff(np.append(ci, m2)))
        out[:, r0 // g: r0 // g + len(ri)] = s / cnt
    return out, source == "model output"


def write(out, image, path, *, level: int = 0, cls=None, top=None, labels=None, output: str | None = None) -> None:
    """The overview PNG at ``path``, written whole or not at all; a failed
    allocation (reading the map, shrinking, drawing) is one line: the
    picture's size is fixed (``MAX_SIDE``), the map in ``out`` is complete."""
    try:
        from .. import draw
    except ImportError:
        raise Fc2ConvError("--overview needs the heatmap renderer (onnx_fc2conv.draw), which this installation "
                           "lacks") from None
    try:
        _write(draw, out, image, path, level=level, cls=cls, top=top, labels=labels, output=output)
    except (MemoryError, draw.OutOfMemory) as exc:
        what = str(exc) if isinstance(exc, draw.OutOfMemory) else \
            "drawing it needs more memory than this process can get"
        raise Fc2ConvError(f"--overview {path}: {what}; the map in {out} is complete: run the same command with "
                           "--resume and more memory free to draw it") from None


def _write(draw, out, image, path, *, level, cls, top, labels, output) -> None:
    from ..images import open_image
    from ..save import atomic_write

    attrs = store.read_attrs(out)
    axes = [MapAxis.from_dict(a) for a in attrs["geometry"]["axes"]]
    if len(axes) != 2:
        raise Fc2ConvError(f"--overview draws 2-D maps; this map has {len(axes)} spatial axes")
    name = output or next(iter(attrs["outputs"]))
    arr = store.zarr().open_group(str(out), mode="r")[name]
    with open_image(image, level=level, spatial_rank=2) as img:
        f = max(1, math.ceil(max(img.shape) / MAX_SIDE))
        small = shrink(img, f)
    stride = min(a.stride for a in axes)
    g = max(1, math.ceil(f / stride))
    probs, _ = merged_probabilities(arr, g)
    if cls is not None and not 0 <= cls < probs.shape[0]:
        raise Fc2ConvError(f"--class {cls}: the model has classes 0..{probs.shape[0] - 1}")
    if g > 1:
        axes = [MapAxis(a.input, a.input_axis, a.stride * g, a.receptive_field + (g - 1) * a.stride, a.offset)
                for a in axes]
    picture = draw.picture(small, probs, axes, zoom=1.0 / f, cls=cls, top=top, labels=labels, legend=True,
                           caption=f"{attrs['image']['path'] or 'image'} at 1/{f}" if f > 1 else None)
    atomic_write(path, [draw.png_bytes(picture)])
