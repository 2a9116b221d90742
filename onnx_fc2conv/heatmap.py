"""Class scores drawn over an image: the dense model run once on the whole
image, each map position painted where it looks.

Position ``p`` of a score map along an axis sees the input pixels
``[offset + p*stride, offset + p*stride + rf - 1]`` (geometry.py). Windows
overlap, so each position paints only the centre ``stride``-wide cell of its
window::

    cell(p) = [c0 + p*stride, c0 + (p+1)*stride),   c0 = offset + (rf - stride) / 2

and consecutive cells tile the image without gaps or overlaps; the margin of
``(rf - stride) / 2`` pixels around the border, which no window is centred on,
stays unpainted.

Preprocessing: ``x = (pixels * scale - mean) / std`` per channel, pixels as
stored (0..255 for 8-bit images), in the layout of the model's image input
(NCHW or NHWC, read from the dense geometry).

Colours are probabilities: the model's output when it already is one (values
in [0, 1] summing to 1 over the classes at every position), otherwise the
softmax of the scores over the class axis. ``--class K`` paints P(K) with a
colour scale; ``--top N`` paints a label map, each cell split into N bands
(best class first) in its class's colour, opacity = probability, with the
class drawn where the cell is large enough and the class likely (>= 0.5).

Needs Pillow (``pip install pillow``); only this module imports it.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import Fc2ConvError

log = logging.getLogger(__name__)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
LEGEND_MIN_WIDTH = 240
TEXT_MIN_PROBABILITY = 0.5


def pillow():
    """The PIL modules, or the one line that says how to get them."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise Fc2ConvError("heatmap needs Pillow to read and write images: pip install pillow") from None
    return Image, ImageDraw, ImageFont


def class_colour(k: int) -> tuple[int, int, int]:
    if k < len(PALETTE):
        return PALETTE[k]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.92)
    return int(r * 255), int(g * 255), int(b * 255)


def colour_scale(v: np.ndarray) -> np.ndarray:
    """Viridis-like colours for values in [0, 1] (linear between 5 anchors)."""
    v = np.clip(np.asarray(v, np.float64), 0.0, 1.0) * (len(VIRIDIS) - 1)
    i = np.minimum(np.floor(v).astype(int), len(VIRIDIS) - 2)
    t = (v - i)[..., None]
    return VIRIDIS[i] * (1 - t) + VIRIDIS[i + 1] * t


# --------------------------------------------------------------- model ---

@dataclass
class Prepared:
    """The dense model and what heatmap needs to feed and read it."""
    model: onnx.ModelProto
    geometry: dict            # the head's geometry (axes: stride, receptive_field, offset, ...)
    input: str                # the image input
    layout: str               # "NCHW" or "NHWC"
    channels: int
    elem_type: int
    output: str               # the score map read
    converted: bool           # False when the model was dense already


def prepare(model, *, dense_stride: int | None = None, input_shapes=None) -> Prepared:
    """Make ``model`` dense (unless it is already) and find its image input."""
    from . import api

    result = api.convert(model, dense=True, input_shapes=input_shapes, dense_stride=dense_stride)
    if result.heads:
        geometry, converted = result.geometry[0], True
        output = geometry["outputs"][0]
    else:
        geometry, output = _traced_geometry(result.model)
        converted = False
        if dense_stride:
            from . import atrous

            fine = atrous.apply(result.model, [geometry], dense_stride)
            result.model, geometry = fine.model, fine.geometry[0]
    dense = result.model
    axes = geometry["axes"]
    if len(axes) != 2:
        raise Fc2ConvError(f"heatmap draws 2-D images; the model's score map has {len(axes)} spatial "
                           f"ax{'is' if len(axes) == 1 else 'es'}")
    name = axes[0]["input"]
    inits = {t.name for t in dense.graph.initializer}
    others = [i.name for i in dense.graph.input if i.name not in inits and i.name != name]
    if others:
        raise Fc2ConvError(f"heatmap feeds one image input ({name!r}); the model also needs "
                           f"{', '.join(map(repr, others))}")
    inp = next(i for i in dense.graph.input if i.name == name)
    dims = inp.type.tensor_type.shape.dim
    spatial = sorted(a["input_axis"] for a in axes)
    if len(dims) != 4 or spatial not in ([2, 3], [1, 2]):
        raise Fc2ConvError(f"input {name!r} is not an image batch [N,C,H,W] or [N,H,W,C] (rank {len(dims)}, "
                           f"spatial axes {spatial})")
    layout = "NCHW" if spatial == [2, 3] else "NHWC"
    c_dim = dims[1] if layout == "NCHW" else dims[3]
    if not c_dim.HasField("dim_value"):
        raise Fc2ConvError(f"input {name!r} has no fixed channel count; give it with --input-shape")
    if dims[0].HasField("dim_value") and dims[0].dim_value != 1:
        raise Fc2ConvError(f"input {name!r} has a fixed batch of {dims[0].dim_value}; heatmap feeds one image")
    return Prepared(dense, geometry, name, layout, int(c_dim.dim_value), inp.type.tensor_type.elem_type,
                    output, converted)


def _traced_geometry(model: onnx.ModelProto):
    """Geometry of a model that is fully convolutional already: its first
    output whose spatial axes trace back to an input."""
    from .atrous import traced_geometry

    found = traced_geometry(model)
    if not found:
        raise Fc2ConvError("the model has no FC head to make dense and no output that is a score map "
                           "[N, classes, H', W']; heatmap needs an image classifier")
    return found[0], found[0]["outputs"][0]


# --------------------------------------------------------------- image ---

def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise Fc2ConvError(f"--size {text!r}: write H,W (two positive integers), e.g. 64,96") from None
    if h <= 0 or w <= 0:
        raise Fc2ConvError(f"--size {text!r}: both sizes must be positive")
    return h, w


def parse_scale(text) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    try:
        if "/" in text:
            a, b = text.split("/")
            value = float(a) / float(b)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise Fc2ConvError(f"--scale {text!r}: write a number or a fraction such as 1/255") from None
    if not math.isfinite(value) or value == 0:
        raise Fc2ConvError(f"--scale {text!r}: must be a finite non-zero number")
    return value


def parse_channels(text, what: str, channels: int) -> np.ndarray:
    if text is None:
        return np.full(channels, 0.0 if what == "--mean" else 1.0)
    if isinstance(text, (int, float)):
        values = [float(text)]
    else:
        try:
            values = [float(v) for v in str(text).split(",")]
        except ValueError:
            raise Fc2ConvError(f"{what} {text!r}: write one number or one per channel, comma-separated") from None
    if len(values) not in (1, channels):
        raise Fc2ConvError(f"{what} {text!r}: {len(values)} values for a model with {channels} channel(s); "
                           f"give 1 or {channels}")
    arr = np.array(values * (channels if len(values) == 1 else 1), np.float64)
    if what == "--std" and np.any(arr == 0):
        raise Fc2ConvError(f"--std {text!r}: must not be zero")
    return arr


def read_image(path, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels [H, W, channels] as stored (uint8 0..255 for 8-bit images).

    A gray model takes gray images (and colour images whose pixels are all
    gray); an RGB model takes RGB images (alpha and palettes are resolved).
    """
    Image, _, _ = pillow()
    path = Path(path)
    if not path.exists():
        raise Fc2ConvError(f"{path}: no such file")
    if path.is_dir():
        raise Fc2ConvError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                mode = img.mode
            if size is not None:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            if mode in GRAY_MODES:
                if mode in ("LA", "La"):
                    img = img.getchannel(0)
                elif mode == "1":
                    img = img.convert("L")
                pixels = np.asarray(img)[..., None]
            elif mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
                pixels = np.asarray(img.convert("RGB") if mode != "RGB" else img)
            else:
                raise Fc2ConvError(f"{path}: image mode {mode} is not gray or RGB")
    except Fc2ConvError:
        raise
    except Image.DecompressionBombError as exc:
        raise Fc2ConvError(f"{path}: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        why = "not an image Pillow can read" if isinstance(exc, Image.UnidentifiedImageError) else \
            f"cannot read the image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        raise Fc2ConvError(f"{path}: {why}") from None
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if have == 3 and channels == 1:
        if np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
            return pixels[..., :1]
        raise Fc2ConvError(f"{path}: a colour (RGB) image, but the model's input has 1 channel; "
                           "convert the image to grayscale first")
    kind = {1: "a grayscale image", 3: "an RGB image"}[have]
    raise Fc2ConvError(f"{path}: {kind} ({have} channel{'s' if have > 1 else ''}), but the model's input has "
                       f"{channels} channels" + ("; give an RGB image" if channels == 3 else ""))


def preprocess(pixels: np.ndarray, prep: Prepared, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(pixels * scale - mean) / std`` as one [1, ...] batch in the model's layout and dtype."""
    x = (pixels.astype(np.float64) * scale - mean) / std          # [H, W, C]
    x = x.transpose(2, 0, 1) if prep.layout == "NCHW" else x
    return x[None].astype(helper.tensor_dtype_to_np_dtype(prep.elem_type))


# --------------------------------------------------------------- result ---

@dataclass
class Heatmap:
    """One image's score map and how to draw it."""
    pixels: np.ndarray          # [H, W, C] as read
    scores: np.ndarray          # [classes, H', W'] the dense model's output for this image
    probabilities: np.ndarray   # [classes, H', W']
    probability_source: str     # "model output" or "softmax of the scores"
    prep: Prepared
    image: str = ""
    model: str = ""
    cls: int | None = None
    top: int = 1
    labels: list = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)

    @property
    def axes(self) -> list[dict]:
        return self.prep.geometry["axes"]

    def name(self, k: int) -> str:
        return f"{k} {self.labels[k]}" if k < len(self.labels) and self.labels[k] != str(k) else str(k)

    def ranking(self) -> np.ndarray:
        """Class indices per position, best first: [top, H', W'] (ties: lower index first)."""
        order = np.argsort(-self.probabilities, axis=0, kind="stable")
        return order[:max(self.top, 1)]

    def cells(self, zoom: int):
        """For each drawn pixel row/column, the map position whose centre cell
        holds it (-1 where none): two index vectors."""
        h, w = self.pixels.shape[:2]
        out = []
        for a, n, m in zip(self.axes, (h, w), self.scores.shape[1:]):
            s, rf, off = a["stride"], a["receptive_field"], a["offset"]
            c0 = off + (rf - s) / 2.0
            u = (np.arange(n * zoom) + 0.5) / zoom           # pixel centres in image units
            p = np.floor((u - c0) / s).astype(np.int64)
            p[(p < 0) | (p >= m)] = -1
            out.append(p)
        return out

    def to_dict(self, png: str | None = None, zoom: int = 1) -> dict:
        ranking = self.ranking()
        top = [[[{"class": int(ranking[k, i, j]), "score": float(self.scores[ranking[k, i, j], i, j]),
                  "probability": float(self.probabilities[ranking[k, i, j], i, j])}
                 for k in range(ranking.shape[0])]
                for j in range(self.scores.shape[2])] for i in range(self.scores.shape[1])]
        h, w = self.pixels.shape[:2]
        return {"model": self.model, "image": self.image, "image_size": [h, w],
                "input": self.prep.input, "layout": self.prep.layout, "preprocessing": self.preprocessing,
                "converted_to_dense": self.prep.converted, "output": self.prep.output,
                "classes": int(self.scores.shape[0]), "labels": list(self.labels),
                "map_size": list(self.scores.shape[1:]), "geometry": self.prep.geometry,
                "cell": "position (i, j) is painted over the centre stride x stride cell of its window: "
                        "[offset + (rf - stride)/2 + p*stride, ... + stride) along each axis",
                "probability": self.probability_source, "class": self.cls, "top_n": self.top,
                "scores": self.scores.tolist(), "top": top,
                "png": None if png is None else {"path": png, "zoom": zoom, "image_box": [0, 0, w * zoom, h * zoom]}}

    # ------------------------------------------------------------ drawing ---

    def render(self, zoom: int = 1):
        """The picture: the image (times ``zoom``) with the map over it and a legend strip below."""
        Image, ImageDraw, ImageFont = pillow()
        font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") \
            else ImageFont.load_default()
        h, w = self.pixels.shape[:2]
        base = self.pixels.astype(np.float64)
        if base.shape[2] == 1:
            base = np.repeat(base, 3, axis=2)
        if self.pixels.dtype != np.uint8:    # 16-bit or float images: stretch for display
            lo, hi = float(base.min()), float(base.max())
            base = (base - lo) / (hi - lo or 1.0) * 255.0
        base = np.repeat(np.repeat(base, zoom, axis=0), zoom, axis=1)
        rows, cols = self.cells(zoom)
        inside = (rows[:, None] >= 0) & (cols[None, :] >= 0)
        ri, ci = np.maximum(rows, 0), np.maximum(cols, 0)
        if self.cls is not None:
            value = self.probabilities[self.cls][ri[:, None], ci[None, :]]
            colour = colour_scale(value)
            alpha = np.full(value.shape, 0.6)
        else:
            ranking = self.ranking()
            n = ranking.shape[0]
            band = self._bands(rows, zoom, n)
            k = ranking[band[:, None], ri[:, None], ci[None, :]]
            prob = self.probabilities[k, ri[:, None], ci[None, :]]
            colour = np.array([class_colour(c) for c in range(self.scores.shape[0])], np.float64)[k]
            alpha = 0.85 * prob
        alpha = np.where(inside, alpha, 0.0)[..., None]
        drawn = np.clip(np.rint(base * (1 - alpha) + colour * alpha), 0, 255).astype(np.uint8)
        width = max(w * zoom, LEGEND_MIN_WIDTH)
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        legend = self._legend_lines(width - 8, lambda t: int(measure.textlength(t, font=font)))
        line_h = 13
        height = h * zoom + 6 + line_h * len(legend) + 4
        canvas = Image.new("RGB", (width, height), (24, 24, 24))
        canvas.paste(Image.fromarray(drawn, "RGB"), (0, 0))
        draw = ImageDraw.Draw(canvas)
        if self.cls is None:
            self._label_cells(draw, font, zoom)
        y = h * zoom + 6
        for line in legend:
            x = 4
            for kind, item in line:
                if kind == "text":
                    draw.text((x, y), item, fill=(230, 230, 230), font=font)
                    x += int(draw.textlength(item, font=font)) + 4
                elif kind == "swatch":
                    draw.rectangle([x, y + 1, x + 9, y + 10], fill=class_colour(item))
                    x += 13
                elif kind == "scale":
                    ramp = colour_scale(np.linspace(0, 1, 100))
                    for i, c in enumerate(ramp):
                        draw.line([x + i, y + 1, x + i, y + 10], fill=tuple(int(round(v)) for v in c))
                    x += 104
            y += line_h
        return canvas

    def _bands(self, rows, zoom, n):
        """Band index (0..n-1, best class first) of each drawn row within its cell."""
        if n == 1:
            return np.zeros(len(rows), np.int64)
        a = self.axes[0]
        s, rf, off = a["stride"], a["receptive_field"], a["offset"]
        c0 = off + (rf - s) / 2.0
        u = (np.arange(len(rows)) + 0.5) / zoom
        frac = ((u - c0) / s) - np.floor((u - c0) / s)
        return np.minimum((frac * n).astype(np.int64), n - 1)

    def _label_cells(self, draw, font, zoom):
        """The best class written in each cell that is large enough and likely enough."""
        ranking = self.ranking()
        a_y, a_x = self.axes
        h, w = self.pixels.shape[:2]
        for i in range(self.scores.shape[1]):
            for j in range(self.scores.shape[2]):
                k = int(ranking[0, i, j])
                if self.probabilities[k, i, j] < TEXT_MIN_PROBABILITY:
                    continue
                y0 = (a_y["offset"] + (a_y["receptive_field"] - a_y["stride"]) / 2 + i * a_y["stride"]) * zoom
                x0 = (a_x["offset"] + (a_x["receptive_field"] - a_x["stride"]) / 2 + j * a_x["stride"]) * zoom
                ch = a_y["stride"] * zoom / max(self.top, 1)
                cw = a_x["stride"] * zoom
                text = str(self.labels[k]) if k < len(self.labels) else str(k)
                left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
                tw, th = right - left, bottom - top
                if tw + 2 > cw or th + 2 > ch or y0 < 0 or x0 < 0 or y0 + ch > h * zoom or x0 + cw > w * zoom:
                    continue
                c = class_colour(k)
                dark = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140
                draw.text((int(x0 + (cw - tw) / 2 - left), int(y0 + (ch - th) / 2 - top)), text,
                          fill=(0, 0, 0) if dark else (255, 255, 255), font=font)

    def _legend_lines(self, width: int, textlength) -> list[list[tuple]]:
        """Legend rows of ("text", str) / ("swatch", class) / ("scale", None) items, fitted to ``width``."""
        ax = self.axes
        fmt = lambda key: "x".join(str(a[key]) for a in ax)  # noqa: E731
        lines = _wrap(f"map {self.scores.shape[1]}x{self.scores.shape[2]}: stride {fmt('stride')}"
                      + (f" (à trous, plain {fmt('plain_stride')})" if "plain_stride" in ax[0] else "")
                      + f", window {fmt('receptive_field')}, offset {fmt('offset')} px", width, textlength)
        if self.cls is not None:
            lines += _wrap(f"P(class {self.name(self.cls)}) of the {self.probability_source}", width, textlength)
            lines.append([("text", "0"), ("scale", None), ("text", "1")])
            return lines
        lines += _wrap(f"top {self.top} class{'es' if self.top > 1 else ''} per cell"
                       + (" (bands, best on top)" if self.top > 1 else "") + "; opacity = probability",
                       width, textlength)
        present = sorted(int(c) for c in np.unique(self.ranking()))
        shown = present[:40]
        line, used = [], 0
        for k in shown:
            need = 13 + textlength(self.name(k)) + 4
            if line and used + need > width:
                lines.append(line)
                line, used = [], 0
            line += [("swatch", k), ("text", self.name(k))]
            used += need
        if line:
            lines.append(line)
        if len(present) > len(shown):
            lines += _wrap(f"... and {len(present) - len(shown)} more classes", width, textlength)
        return lines

    def png_bytes(self, zoom: int = 1) -> bytes:
        buf = io.BytesIO()
        self.render(zoom).save(buf, format="PNG", optimize=False)
        return buf.getvalue()


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


def probabilities(scores: np.ndarray) -> tuple[np.ndarray, str]:
    """``scores`` [classes, ...] as probabilities over the class axis."""
    s = scores.astype(np.float64)
    if s.size and np.all((s >= 0) & (s <= 1)) and np.allclose(s.sum(axis=0), 1.0, atol=1e-3):
        return s, "model output"
    e = np.exp(s - s.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True), "softmax of the scores"


def heatmap(model, image, *, cls: int | None = None, top: int | None = None, scale=1 / 255, mean=None,
            std=None, size=None, dense_stride: int | None = None, provider: str = "cpu", input_shapes=None,
            labels=None, progress=None) -> Heatmap:
    """Run ``model`` (made dense unless it is) once on ``image`` and return its score map.

    Args:
        model: a path or an ``onnx.ModelProto``: a classifier with FC layers, or a dense model.
        image: a PNG/JPEG path, gray or RGB as the model's input wants.
        cls: draw P(class ``cls``) with a colour scale; else ``top`` (default 1) classes per position.
        scale, mean, std: ``x = (pixels * scale - mean) / std``; mean/std one value or one per channel.
        size: ``(H, W)`` to resize the image to first (bilinear), or ``"H,W"``.
        dense_stride: a finer map (à trous, see atrous.py).
    """
    progress = progress or (lambda message: None)
    if cls is not None and top is not None:
        raise Fc2ConvError("give --class or --top, not both")
    if top is not None and top < 1:
        raise Fc2ConvError(f"--top {top}: must be at least 1")
    size = parse_size(size) if isinstance(size, str) else size
    scale = parse_scale(scale)
    pillow()
    progress(f"making {model if isinstance(model, (str, os.PathLike)) else 'the model'} dense")
    prep = prepare(model, dense_stride=dense_stride, input_shapes=input_shapes)
    mean_v = parse_channels(mean, "--mean", prep.channels)
    std_v = parse_channels(std, "--std", prep.channels)
    pixels = read_image(image, prep.channels, size)
    x = preprocess(pixels, prep, scale, mean_v, std_v)
    h, w = pixels.shape[:2]
    progress(f"running the dense model on {h}x{w} pixels ({provider})")
    from .check.run import session

    sess = session(prep.model, provider, "the dense model")
    try:
        out = sess.run([prep.output], {prep.input: x})[0]
    except Exception as exc:  # onnxruntime's message says which dim does not fit
        rf = "x".join(str(a["receptive_field"]) for a in prep.geometry["axes"])
        raise Fc2ConvError(f"{image}: onnxruntime cannot run the dense model on this {h}x{w} image "
                           f"(is it smaller than the model's {rf} window?): {str(exc).splitlines()[0]}") from None
    if out.ndim != 4 or out.shape[0] != 1 or min(out.shape[2:]) < 1:
        raise Fc2ConvError(f"{image}: the {h}x{w} image gives a score map of shape {list(out.shape)}; "
                           "it must be at least the model's native input size")
    scores = out[0]
    classes = scores.shape[0]
    if cls is not None and not 0 <= cls < classes:
        raise Fc2ConvError(f"--class {cls}: the model has classes 0..{classes - 1}")
    if top is not None and top > classes:
        raise Fc2ConvError(f"--top {top}: the model has only {classes} classes")
    probs, source = probabilities(scores)
    labels = list(labels or [])
    return Heatmap(pixels, scores, probs, source, prep, str(image),
                   str(model) if isinstance(model, (str, os.PathLike)) else "", cls,
                   1 if cls is None and top is None else (top or 1), labels,
                   {"scale": scale, "mean": mean_v.tolist(), "std": std_v.tolist(),
                    "size": list(size) if size else None})


def read_labels(path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Fc2ConvError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Fc2ConvError(f"{path}: cannot read the labels: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _destination(path, what: str, sources) -> Path:
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise Fc2ConvError(f"{path}: the {what} folder does not exist")
    if target.is_dir():
        raise Fc2ConvError(f"{path}: is a directory; give a file name for the {what}")
    for src in sources:
        try:
            same = target.exists() and os.path.samefile(target, src)
        except OSError:
            same = False
        if same:
            raise Fc2ConvError(f"{path}: the {what} would overwrite the input {src}; choose another name")
    return target


def command(args, out) -> int:
    """``onnx-fc2conv heatmap``: the PNG (and --json), written atomically
    once everything has worked; nothing is written on an error."""
    import json

    from .save import atomic_write

    sources = [args.input, args.image]
    png = _destination(args.output, "picture", sources)
    js = _destination(args.json_out, "JSON", sources) if args.json_out else None
    if args.zoom < 1 or args.zoom > 64:
        raise Fc2ConvError(f"--zoom {args.zoom}: give an integer from 1 to 64")
    labels = read_labels(args.labels) if args.labels else None
    result = heatmap(args.input, args.image, cls=args.cls, top=args.top, scale=args.scale, mean=args.mean,
                     std=args.std, size=args.size, dense_stride=args.dense_stride, provider=args.provider,
                     input_shapes=args.input_shape, labels=labels, progress=args.progress)
    args.progress(f"drawing {args.output}")
    data = result.png_bytes(args.zoom)
    payload = None
    if js is not None:
        payload = json.dumps(result.to_dict(str(png), args.zoom)).encode() + b"\n"
    atomic_write(png, [data])
    if js is not None:
        atomic_write(js, [payload])
    h, w = result.pixels.shape[:2]
    ax = result.axes
    out(f"{args.image}: {h}x{w} pixels (HxW), map {result.scores.shape[1]}x{result.scores.shape[2]} of "
        f"{result.scores.shape[0]} classes (stride {ax[0]['stride']}, window {ax[0]['receptive_field']} px)"
        + ("" if result.prep.converted else "; the model was dense already"))
    out(f"wrote {png}" + (f", {js}" if js is not None else ""))
    return 0
