"""The picture of a score map: an image with each map position painted where
it looks (used by ``heatmap`` and by ``scan``'s overview).

Position ``p`` of a map along an axis sees the input pixels
``[offset + p*stride, offset + p*stride + rf - 1]`` (geometry.py). Windows
overlap, so each position paints only the centre ``stride``-wide cell of its
window::

    cell(p) = [c0 + p*stride, c0 + (p+1)*stride),   c0 = offset + (rf - stride) / 2

in input pixels; consecutive cells tile the image without gaps or overlaps,
and the margin of ``(rf - stride) / 2`` pixels that no window is centred on
stays unpainted. The picture is the input times ``zoom``: picture pixel ``i``
covers input pixels ``[i/zoom, (i+1)/zoom)``.

Each cell carries a colour ``c`` and an opacity ``a``, and the picture is the
image with the cells laid over it: ``out = image * (1 - A) + P`` with ``A``
and ``P`` the averages of ``a`` and of ``a * c`` over the picture pixel.
Where a cell spans at least one picture pixel (``stride * zoom >= 1``) the
pixel takes the cell its centre falls in (no blending of neighbours at
integer zooms); where cells are smaller than a pixel (an overview of a large
image, zoom 0.01) the averages are exact area averages, computed per axis
from cumulative sums at the map's resolution, so a 2000x2000 map costs a few
passes over the map, not one per picture pixel per cell.

Colours: ``cls=K`` paints P(K) with a viridis-like scale at opacity 0.6;
otherwise the ``top`` (default 1) classes per position, each cell split into
``top`` horizontal bands (best class first) in its class's colour, opacity
0.85 x its probability, with the best class written in cells large enough
for the text where it is likely (>= 0.5).

Needs Pillow (``pip install pillow``); the only module that draws with it.
A failed allocation while drawing (numpy's or Pillow's MemoryError) is an
:class:`OutOfMemory`, one line naming the picture's size; the callers add
how to draw a smaller one.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import math

import numpy as np

from .errors import Fc2ConvError

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)
CLASS_ALPHA = 0.6          # opacity of the colour scale with cls=K
TOP_ALPHA = 0.85           # opacity of a class's colour at probability 1
TEXT_MIN_PROBABILITY = 0.5
LINE_HEIGHT = 13           # legend rows
BACKGROUND = (24, 24, 24)  # the legend strip


class OutOfMemory(Fc2ConvError):
    """The picture needs more memory than this process can get."""


@contextlib.contextmanager
def enough_memory(h: int, w: int):
    """A MemoryError inside becomes :class:`OutOfMemory` for an ``h`` x ``w`` picture."""
    try:
        yield
    except MemoryError as exc:
        detail = " ".join(str(exc).split()).split(" for an array")[0]    # numpy's: "Unable to allocate 1.43 GiB"
        raise OutOfMemory(f"drawing the {h}x{w} px picture needs more memory than this process can get"
                          + (f" ({detail})" if detail else "")) from None


def pillow():
    """The PIL modules, or the one line that says how to get them."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise Fc2ConvError("drawing a map needs Pillow: pip install pillow") from None
    return Image, ImageDraw, ImageFont


def class_colour(k: int) -> tuple[int, int, int]:
    """Class ``k``'s colour: a fixed palette for the first ten, then golden-ratio hues."""
    if k < len(PALETTE):
        return PALETTE[k]
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.92)
    return int(r * 255), int(g * 255), int(b * 255)


def colour_scale(v: np.ndarray) -> np.ndarray:
    """Viridis-like colours for values in [0, 1] (linear between 5 anchors)."""
    v = np.clip(np.asarray(v, np.float64), 0.0, 1.0) * (len(VIRIDIS) - 1)
    i = np.minimum(np.floor(v).astype(int), len(VIRIDIS) - 2)
    t = (v - i)[..., None]
    return VIRIDIS[i] * (1 - t) + VIRIDIS[i + 1] * t


def scaled(pixels: np.ndarray, zoom: float) -> np.ndarray:
    """``pixels`` [H, W] or [H, W, C] as the picture's uint8 image, its size
    ``round(H*zoom) x round(W*zoom)``: whole zooms repeat pixels, others
    resample (area average when shrinking). 16-bit or float images are
    stretched from their min..max to 0..255 for display."""
    zoom = _zoom(zoom)
    px = np.asarray(pixels)
    if px.ndim < 2:
        raise Fc2ConvError(f"an image to draw is [H, W] or [H, W, C]; got shape {list(px.shape)}")
    with enough_memory(max(1, round(px.shape[0] * zoom)), max(1, round(px.shape[1] * zoom))):
        return _scaled(px, zoom)


def _scaled(px: np.ndarray, zoom: float) -> np.ndarray:
    if px.ndim == 3 and px.shape[2] == 1:
        px = px[..., 0]
    if px.dtype != np.uint8:
        f = px.astype(np.float64)
        lo, hi = (float(f.min()), float(f.max())) if f.size else (0.0, 1.0)
        px = np.clip(np.rint((f - lo) / (hi - lo or 1.0) * 255.0), 0, 255).astype(np.uint8)
    if px.ndim == 3 and px.shape[2] not in (3,):
        px = px[..., :3] if px.shape[2] > 3 else px[..., 0]
    if zoom == int(zoom):
        z = int(zoom)
        return np.repeat(np.repeat(px, z, axis=0), z, axis=1)
    Image, _, _ = pillow()
    h, w = px.shape[:2]
    size = (max(1, round(w * zoom)), max(1, round(h * zoom)))
    how = Image.Resampling.BOX if zoom < 1 else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(px).resize(size, how))


def picture(image, probs, axes, *, zoom=1.0, cls=None, top=None, labels=None, legend=False, caption=None):
    """The map drawn over the image, as a ``PIL.Image.Image`` (RGB).

    Args:
        image: [H, W] or [H, W, C] pixels ALREADY at the picture's scale (the
            input's size times ``zoom``, e.g. from :func:`scaled`); uint8 as it
            is, other dtypes stretched min..max. The picture's image area is
            exactly H x W, never padded.
        probs: [classes, *map] probabilities, map axes in the order of ``axes``.
        axes: one ``geometry.MapAxis`` per map axis (rows, columns): stride,
            receptive_field and offset in input pixels at zoom 1.
        zoom: picture pixels per input pixel (any positive number; below 1 for
            the overview of a large image, where cells are area-averaged).
        cls: paint P(class ``cls``) with a colour scale; else
        top: the ``top`` best classes per position (default 1), as bands.
        labels: class names (index ``k`` -> ``labels[k]``) for the text and legend.
        legend: add a strip below the image with the geometry and the colours.
        caption: a first line for the strip (a strip is added for it even
            without ``legend``).
    """
    pillow()
    zoom = _zoom(zoom)
    probs = np.asarray(probs)
    axes = [_axis(a) for a in axes]
    if len(axes) != 2 or probs.ndim != 3 or min(probs.shape) < 1:
        raise Fc2ConvError(f"a picture needs a map with 2 spatial axes and at least one class and position; got "
                           f"{len(axes)} axes and probabilities of shape {list(probs.shape)}")
    classes = probs.shape[0]
    if cls is not None and top is not None:
        raise Fc2ConvError("give cls or top, not both")
    if cls is not None and not 0 <= cls < classes:
        raise Fc2ConvError(f"class {cls}: the map has classes 0..{classes - 1}")
    n = 1 if cls is not None else int(top or 1)
    if not 1 <= n <= classes:
        raise Fc2ConvError(f"top {n}: give 1 to {classes} (the map's classes)")
    labels = list(labels or [])
    image = np.asarray(image)
    if image.ndim < 2:
        raise Fc2ConvError(f"a picture's image is [H, W] or [H, W, C]; got shape {list(image.shape)}")
    with enough_memory(*image.shape[:2]):
        return _picture(image, probs, axes, zoom, cls, n, labels, legend, caption)


def _picture(image, probs, axes, zoom, cls, n, labels, legend, caption):
    Image, ImageDraw, ImageFont = pillow()
    base = _rgb(image)
    h, w = base.shape[:2]
    ranking = None if cls is not None else _ranking(probs, n)
    premult, alpha = _overlay(probs, ranking, axes, cls, zoom, (h, w))
    drawn = np.clip(np.rint(base * (1 - alpha[..., None]) + premult), 0, 255).astype(np.uint8)
    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") \
        else ImageFont.load_default()
    lines = []
    if legend or caption:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        textlength = lambda t: int(measure.textlength(t, font=font))  # noqa: E731
        lines = _wrap(caption, w - 8, textlength) if caption else []
        if legend:
            lines += _legend_lines(probs.shape, axes, cls, n, ranking, labels, w - 8, textlength)
    height = h + (6 + LINE_HEIGHT * len(lines) + 4 if lines else 0)
    canvas = Image.new("RGB", (w, height), BACKGROUND)
    canvas.paste(Image.fromarray(drawn, "RGB"), (0, 0))
    pen = ImageDraw.Draw(canvas)
    if ranking is not None:
        _label_cells(pen, font, probs, ranking, axes, zoom, (h, w), labels)
    _draw_legend(pen, font, lines, h + 6)
    return canvas


def png_bytes(img) -> bytes:
    """``img`` (a PIL image) as PNG file contents."""
    buf = io.BytesIO()
    with enough_memory(img.height, img.width):
        img.save(buf, format="PNG", optimize=False)
        return buf.getvalue()


# ------------------------------------------------------------------ cells ---

def _zoom(zoom) -> float:
    z = float(zoom)
    if not math.isfinite(z) or z <= 0:
        raise Fc2ConvError(f"zoom {zoom!r}: must be a positive number")
    return z


def _axis(a):
    """A MapAxis (a dict from a JSON report is read as one)."""
    if isinstance(a, dict):
        from .geometry import MapAxis

        return MapAxis.from_dict(a)
    return a


def _rgb(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] float64 0..255 for display."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise Fc2ConvError(f"a picture's image is [H, W] or [H, W, C]; got shape {list(image.shape)}")
    base = image.astype(np.float64)
    if image.dtype != np.uint8:
        lo, hi = float(base.min()), float(base.max())
        base = (base - lo) / (hi - lo or 1.0) * 255.0
    if base.shape[2] in (1, 2):
        return np.repeat(base[..., :1], 3, axis=2)
    return base[..., :3]


def _ranking(probs: np.ndarray, n: int) -> np.ndarray:
    """Class indices per position, best first: [n, *map] (ties: lower index first)."""
    if n == 1:
        return np.argmax(probs, axis=0)[None]
    return np.argsort(-probs, axis=0, kind="stable")[:n]


def _start(a) -> float:
    """``c0``: where cell 0 begins, in input pixels."""
    return a.offset + (a.receptive_field - a.stride) / 2.0


def _overlay(probs, ranking, axes, cls, zoom, size):
    """``(P, A)``: the cells' premultiplied colour [H, W, 3] and opacity [H, W]
    at the picture's pixels."""
    if cls is not None:
        p = probs[cls].astype(np.float64)
        layers = [(colour_scale(p) * CLASS_ALPHA, np.full(p.shape, CLASS_ALPHA))]
    else:
        table = np.array([class_colour(c) for c in range(probs.shape[0])], np.float64)
        layers = []
        for k in ranking:                       # band b: the b-th best class
            a = TOP_ALPHA * np.take_along_axis(probs, k[None], axis=0)[0].astype(np.float64)
            layers.append((table[k] * a[..., None], a))
    n = len(layers)
    ay, ax = axes
    cols = _Axis(size[1], zoom, _start(ax), ax.stride, probs.shape[2])
    premult = np.zeros(size + (3,))
    alpha = np.zeros(size)
    for b, (colour, a) in enumerate(layers):
        rows = _Axis(size[0], zoom, _start(ay), ay.stride, probs.shape[1], band=b, bands=n)
        stack = np.concatenate([colour, a[..., None]], axis=2)       # [h', w', 4]
        out = cols(rows(stack, 0), 1)
        premult += out[..., :3]
        alpha += out[..., 3]
    return premult, alpha


class _Axis:
    """Picture pixels along one axis from the map's cells along it: the cell
    a pixel's centre falls in where cells span a pixel or more, the area
    average over the pixel where they are smaller. With ``bands`` the cells
    are split in that many equal bands and only band ``band`` is kept."""

    def __init__(self, pixels: int, zoom: float, c0: float, stride: int, cells: int, band: int = 0, bands: int = 1):
        self.pixels, self.zoom, self.c0, self.stride, self.cells = pixels, zoom, c0, stride, cells
        self.band, self.bands = band, bands
        self.point = stride * zoom >= 1

    def __call__(self, x: np.ndarray, axis: int) -> np.ndarray:
        return self._point(x, axis) if self.point else self._area(x, axis)

    def _point(self, x, axis):
        u = (np.arange(self.pixels) + 0.5) / self.zoom               # pixel centres in input pixels
        t = (u - self.c0) / self.stride
        p = np.floor(t).astype(np.int64)
        keep = (p >= 0) & (p < self.cells)
        if self.bands > 1:
            keep &= np.minimum(((t - p) * self.bands).astype(np.int64), self.bands - 1) == self.band
        out = np.take(x, np.where(keep, p, 0), axis=axis)
        shape = [1] * x.ndim
        shape[axis] = self.pixels
        return out * keep.reshape(shape)

    def _area(self, x, axis):
        """``(G(e[i+1]) - G(e[i])) * zoom`` with ``G`` the integral of the
        piecewise-constant band function and ``e[i] = i / zoom``: ``G(e) =
        width * sum(x[:q]) + min(e - start(q), width) * x[q]`` for ``e`` in
        cell ``q``. The prefix sums are needed only at the pixel edges, so
        they come from one ``reduceat`` pass over the map, not a cumsum."""
        width = self.stride / self.bands
        t = np.arange(self.pixels + 1) / self.zoom - (self.c0 + self.band * width)
        q = np.floor(t / self.stride).astype(np.int64)
        full = np.clip(q, 0, self.cells)                                 # cells wholly before the edge
        part = np.where((q >= 0) & (q < self.cells), np.clip(t - q * self.stride, 0.0, width), 0.0)
        xm = np.moveaxis(x, axis, 0)
        edges = np.concatenate([[0], full])
        seg = np.add.reduceat(xm, np.minimum(edges, self.cells - 1), axis=0, dtype=np.float64)[:-1]
        seg[edges[:-1] >= edges[1:]] = 0.0                                # empty segments
        seg[(edges[1:] == self.cells) & (edges[:-1] < self.cells - 1)] += xm[-1]   # ends clipped to cells-1
        prefix = np.cumsum(seg, axis=0)                                   # sum(x[:full[k]])
        shape = (-1,) + (1,) * (xm.ndim - 1)
        g = width * prefix + part.reshape(shape) * xm[np.clip(q, 0, self.cells - 1)]
        return np.moveaxis((g[1:] - g[:-1]) * self.zoom, 0, axis)


# ------------------------------------------------------------------- text ---

def _name(k: int, labels) -> str:
    return f"{k} {labels[k]}" if k < len(labels) and labels[k] != str(k) else str(k)


def _label_cells(pen, font, probs, ranking, axes, zoom, size, labels):
    """The best class written in each cell that is large enough and likely
    enough (the text's size is measured once per class, so a large map costs
    one pass over the cells plus one call per word drawn)."""
    ay, ax = axes
    ch, cw = ay.stride * zoom / ranking.shape[0], ax.stride * zoom
    if ch < 3 or cw < 3:
        return                                       # no text fits with its 1-pixel margins
    h, w = size
    y0 = (_start(ay) + np.arange(probs.shape[1]) * ay.stride) * zoom
    x0 = (_start(ax) + np.arange(probs.shape[2]) * ax.stride) * zoom
    rows = (y0 >= 0) & (y0 + ch <= h)
    cols = (x0 >= 0) & (x0 + cw <= w)
    best = ranking[0]
    want = (np.take_along_axis(probs, best[None], axis=0)[0] >= TEXT_MIN_PROBABILITY) & rows[:, None] & cols[None, :]
    boxes = {}
    for k in np.unique(best[want]):
        k = int(k)
        text = str(labels[k]) if k < len(labels) else str(k)
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        if right - left + 2 <= cw and bottom - top + 2 <= ch:
            boxes[k] = (text, left, top, right - left, bottom - top)
    fits = np.zeros(probs.shape[0], bool)
    fits[list(boxes)] = True
    for i, j in zip(*np.nonzero(want & fits[best])):
        k = int(best[i, j])
        text, left, top, tw, th = boxes[k]
        c = class_colour(k)
        dark = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140
        pen.text((int(x0[j] + (cw - tw) / 2 - left), int(y0[i] + (ch - th) / 2 - top)), text,
                 fill=(0, 0, 0) if dark else (255, 255, 255), font=font)


def _legend_lines(shape, axes, cls, n, ranking, labels, width, textlength) -> list[list[tuple]]:
    """Legend rows of ("text", str) / ("swatch", class) / ("scale", pixels) items, fitted to ``width``."""
    fmt = lambda key: "x".join(str(getattr(a, key)) for a in axes)  # noqa: E731
    plain = all(a.plain_stride is not None for a in axes)
    lines = _wrap(f"map {shape[1]}x{shape[2]}: stride {fmt('stride')}"
                  + (f" (à trous, plain {fmt('plain_stride')})" if plain else "")
                  + f", window {fmt('receptive_field')}, offset {fmt('offset')} px", width, textlength)
    if cls is not None:
        lines += _wrap(f"P(class {_name(cls, labels)})", width, textlength)
        lines.append([("text", "0"), ("scale", int(min(100, max(10, width - 2 * textlength("0") - 12)))),
                      ("text", "1")])
        return lines
    lines += _wrap(f"top {n} class{'es' if n > 1 else ''} per cell" + (" (bands, best on top)" if n > 1 else "")
                   + "; opacity = probability", width, textlength)
    present = [int(k) for k in np.nonzero(np.bincount(ranking.ravel(), minlength=shape[0]))[0]]
    shown = present[:40]
    line, used = [], 0
    for k in shown:
        need = 13 + textlength(_name(k, labels)) + 4
        if line and used + need > width:
            lines.append(line)
            line, used = [], 0
        line += [("swatch", k), ("text", _name(k, labels))]
        used += need
    if line:
        lines.append(line)
    if len(present) > len(shown):
        lines += _wrap(f"... and {len(present) - len(shown)} more classes", width, textlength)
    return lines


def _draw_legend(pen, font, lines, y):
    for line in lines:
        x = 4
        for kind, item in line:
            if kind == "text":
                pen.text((x, y), item, fill=(230, 230, 230), font=font)
                x += int(pen.textlength(item, font=font)) + 4
            elif kind == "swatch":
                pen.rectangle([x, y + 1, x + 9, y + 10], fill=class_colour(item))
                x += 13
            elif kind == "scale":                       # item: its width in pixels
                for i, c in enumerate(colour_scale(np.linspace(0, 1, item))):
                    pen.line([x + i, y + 1, x + i, y + 10], fill=tuple(int(round(v)) for v in c))
                x += item + 4
        y += LINE_HEIGHT


def _wrap(text: str, width: int, textlength) -> list[list[tuple]]:
    lines, cur = [], ""
    for word in text.split(" "):
        trial = f"{cur} {word}" if cur else word
        if cur and textlength(trial) > width:
            lines.append([("text", cur)])
            cur = word
        else:
            cur = trial
    if cur:
        lines.append([("text", cur)])
    return lines
