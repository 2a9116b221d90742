"""Class scores of a whole image: the classifier made dense (unless it is
already), run once on the image, its score maps read as probabilities.
``draw.py`` paints them; ``cli.py`` is the command.

Preprocessing: ``x = (pixels * scale - mean) / std`` per channel, pixels as
stored (0..255 for 8-bit images), in the layout of the model's image input
(NCHW or NHWC, read from the dense geometry).

Every output of the dense model that is a score map ``[1, classes, H', W']``
is computed (a multi-task net has several: probability, box, landmarks); the
one drawn is the one named, else the first whose values are probabilities
over the class axis (a Softmax's output: in [0, 1], summing to 1 at every
position), else the only one. Colours are probabilities: the output's values
when they already are, otherwise their softmax over the class axis.

Needs Pillow to read images (``pip install pillow``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import Fc2ConvError
from .geometry import MapGeometry

log = logging.getLogger(__name__)

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def pillow():
    """PIL.Image, or the one line that says how to get it."""
    try:
        from PIL import Image
    except ImportError:
        raise Fc2ConvError("heatmap needs Pillow to read and write images: pip install pillow") from None
    return Image


# --------------------------------------------------------------- model ---

@dataclass
class Prepared:
    """The dense model and what heatmap needs to feed and read it."""
    model: onnx.ModelProto
    maps: dict                # output name -> geometry.MapGeometry, every score-map output in graph order
    input: str                # the image input
    layout: str               # "NCHW" or "NHWC"
    channels: int
    elem_type: int
    converted: bool           # False when the model was dense already


def prepare(model, *, dense_stride: int | None = None, input_shapes=None, output: str | None = None) -> Prepared:
    """Make ``model`` dense (unless it is already) and find its image input
    and its score-map outputs (``output``: the one to be drawn, checked here)."""
    from . import api

    result = api.convert(model, dense=True, input_shapes=input_shapes, dense_stride=dense_stride)
    dense = result.model
    if result.maps:
        heads, converted = result.maps, True
    else:
        heads, converted = _traced(dense), False
        if dense_stride:
            from . import atrous

            fine = atrous.apply(dense, None, dense_stride)
            dense, heads = fine.model, fine.geometry
    by_name = {o: g for g in heads for o in g.outputs}
    maps = {o.name: by_name[o.name] for o in dense.graph.output if o.name in by_name}
    names = [o.name for o in dense.graph.output]
    if not maps:
        raise Fc2ConvError(f"none of the dense model's outputs ({', '.join(map(repr, names))}) is a score map "
                           "[N, classes, H', W'] over the image")
    if output is not None and output not in maps:
        if output not in names:
            raise Fc2ConvError(f"--output {output!r}: the model has no such output; its outputs are "
                               f"{', '.join(map(repr, names))}")
        raise Fc2ConvError(f"--output {output!r} is not a score map over the image; the score maps are "
                           f"{', '.join(map(repr, maps))}")
    axes = maps[output or next(iter(maps))].axes
    if len(axes) != 2:
        raise Fc2ConvError(f"heatmap draws 2-D images; the model's score map has {len(axes)} spatial "
                           f"ax{'is' if len(axes) == 1 else 'es'}")
    name = axes[0].input
    inits = {t.name for t in dense.graph.initializer}
    others = [i.name for i in dense.graph.input if i.name not in inits and i.name != name]
    if others:
        raise Fc2ConvError(f"heatmap feeds one image input ({name!r}); the model also needs "
                           f"{', '.join(map(repr, others))}")
    maps = {o: g for o, g in maps.items() if len(g.axes) == 2 and g.axes[0].input == name}
    inp = next(i for i in dense.graph.input if i.name == name)
    dims = inp.type.tensor_type.shape.dim
    spatial = sorted(a.input_axis for a in axes)
    if len(dims) != 4 or spatial not in ([2, 3], [1, 2]):
        raise Fc2ConvError(f"input {name!r} is not an image batch [N,C,H,W] or [N,H,W,C] (rank {len(dims)}, "
                           f"spatial axes {spatial})")
    layout = "NCHW" if spatial == [2, 3] else "NHWC"
    c_dim = dims[1] if layout == "NCHW" else dims[3]
    if not c_dim.HasField("dim_value"):
        raise Fc2ConvError(f"input {name!r} has no fixed channel count; give it with --input-shape")
    if dims[0].HasField("dim_value") and dims[0].dim_value != 1:
        raise Fc2ConvError(f"input {name!r} has a fixed batch of {dims[0].dim_value}; heatmap feeds one image")
    return Prepared(dense, maps, name, layout, int(c_dim.dim_value), inp.type.tensor_type.elem_type, converted)


def _traced(model: onnx.ModelProto) -> list:
    """Geometry of a model that is fully convolutional already: every output
    whose spatial axes trace back to an input."""
    from .atrous import traced_geometry

    found = traced_geometry(model)
    if not found:
        raise Fc2ConvError("the model has no FC head to make dense and no output that is a score map "
                           "[N, classes, H', W']; heatmap needs an image classifier")
    return found


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


def read_image(path, channels: int, size: tuple[int, int] | None = None, model=None) -> np.ndarray:
    """Pixels [H, W, channels] as stored (uint8 0..255 for 8-bit images).

    A gray model takes gray images (and colour images whose pixels are all
    gray); an RGB model takes RGB images (alpha and palettes are resolved).
    """
    Image = pillow()
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
        raise _bomb(path, exc, model) from None
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



# -------------------------------------------------------------- memory ---

def one_pass_bytes(prep: Prepared, h: int, w: int) -> int | None:
    """The memory one onnxruntime pass of the dense model needs on an ``h x w``
    image, estimated from shape inference at that size: the most bytes of
    activations alive at once (while a node runs: the image, its inputs and
    outputs, and every earlier tensor a later node still reads), the working
    set of a pass whose planner reuses buffers that are dead. onnxruntime's
    arena adds to it (the run's peak RSS plus its input, measured here:
    vgg_small 344 MB at 2048² and 1376 MB at 4096² for 319 and 1275 MB
    estimated, digits 422 MB at 1024² for 270 MB; tests/test_heatmap.py keeps
    the ratio within 0.5..2). None when inference cannot tell the sizes."""
    from . import shapes

    dims = [1, prep.channels, h, w] if prep.layout == "NCHW" else [1, h, w, prep.channels]
    try:
        infos = shapes.infer(prep.model, {prep.input: dims})
    except Fc2ConvError:
        return None
    graph = prep.model.graph
    consts = {t.name for t in graph.initializer}

    def nbytes(name):
        info = infos.get(name)
        if name in consts or info is None or not info.static():
            return 0
        n = 1
        for d in info.shape:
            n *= d
        return n * helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize

    last = {}                                   # tensor -> index of the last node that reads it
    for i, node in enumerate(graph.node):
        for name in node.input:
            last[name] = i
    outputs = {o.name for o in graph.output}
    if prep.input not in infos or not infos[prep.input].static():
        return None
    live = {prep.input: nbytes(prep.input)}
    peak = sum(live.values())
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name:
                live[name] = nbytes(name)
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if n != prep.input and n not in outputs and last.get(n, -1) <= i]:
            del live[name]
    return peak


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable (or the free pages),
    less a cgroup's limit where one is tighter; None when unknown."""
    free = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def scan_command(model, image) -> str:
    """The ``scan`` command that maps ``image`` tile by tile, in bounded memory."""
    m = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "MODEL.onnx"
    i = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "IMAGE"
    return f"onnx-fc2conv scan {m} {i} -o {Path(i).stem}.zarr"


def too_large(why: str, model, image) -> Fc2ConvError:
    """The one line for an image too large for one pass: why, and the scan command."""
    return Fc2ConvError(f"{why}; map it tile by tile in bounded memory with: {scan_command(model, image)}")


def _bomb(path, exc, model) -> Fc2ConvError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return too_large(f"{path}: Pillow refuses it as a possible decompression bomb ({first}), and heatmap "
                     "decodes an image whole", model, path)


def image_size(path, model=None) -> tuple[int, int] | None:
    """(H, W) from the image's header, without decoding it; None when Pillow
    cannot tell (read_image then says why)."""
    Image = pillow()
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Image.DecompressionBombError as exc:
        raise _bomb(path, exc, model) from None
    except Exception:  # noqa: BLE001  (read_image reports the file's problem in its own words)
        return None


def check_memory(prep: Prepared, h: int, w: int, model, image) -> None:
    """Refuse, naming ``scan``, an image whose one pass needs more memory than is free."""
    need = one_pass_bytes(prep, h, w)
    free = available_memory()
    log.info("one pass on %dx%d: about %s of activations; %s free", h, w,
             "?" if need is None else _gb(need), "?" if free is None else _gb(free))
    if need is not None and free is not None and need > free:
        raise too_large(f"{image}: one pass of the dense model over this {h}x{w} image needs about {_gb(need)} "
                        f"and {_gb(free)} is free", model, image)


# --------------------------------------------------------------- result ---

@dataclass
class Heatmap:
    """One image's score maps: every score-map output, and the one to draw
    as probabilities."""
    pixels: np.ndarray          # [H, W, C] as read
    outputs: dict               # output name -> [channels, H', W'] the dense model's output for this image
    output: str                 # the output drawn
    why: str                    # why that one: named, probabilities, the only output
    probabilities: np.ndarray   # [classes, H', W'] of the output drawn
    probability_source: str     # "model output" or "softmax of the scores"
    prep: Prepared
    image: str = ""
    model: str = ""
    cls: int | None = None
    top: int = 1
    labels: list = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)

    @property
    def scores(self) -> np.ndarray:
        """[classes, H', W']: the drawn output's values."""
        return self.outputs[self.output]

    @property
    def map(self) -> MapGeometry:
        """Where the drawn output's positions look."""
        return self.prep.maps[self.output]

    @property
    def axes(self) -> tuple:
        """``geometry.MapAxis`` per map axis (rows, columns) of the drawn output."""
        return self.map.axes

    def ranking(self) -> np.ndarray:
        """Class indices per position, best first: [top, H', W'] (ties: lower index first)."""
        order = np.argsort(-self.probabilities, axis=0, kind="stable")
        return order[:max(self.top, 1)]

    def to_dict(self, png: str | None = None, zoom: float = 1, picture_size=None) -> dict:
        """The --json content: the drawn output as before, and every output's map under ``outputs``."""
        ranking = self.ranking()
        top = [[[{"class": int(ranking[k, i, j]), "score": float(self.scores[ranking[k, i, j], i, j]),
                  "probability": float(self.probabilities[ranking[k, i, j], i, j])}
                 for k in range(ranking.shape[0])]
                for j in range(self.scores.shape[2])] for i in range(self.scores.shape[1])]
        h, w = self.pixels.shape[:2]
        ph, pw = picture_size or (round(h * zoom), round(w * zoom))
        return {"model": self.model, "image": self.image, "image_size": [h, w],
                "input": self.prep.input, "layout": self.prep.layout, "preprocessing": self.preprocessing,
                "converted_to_dense": self.prep.converted, "output": self.output, "output_chosen": self.why,
                "classes": int(self.scores.shape[0]), "labels": list(self.labels),
                "map_size": list(self.scores.shape[1:]), "geometry": self.map.to_dict(),
                "cell": "position (i, j) is painted over the centre stride x stride cell of its window: "
                        "[offset + (rf - stride)/2 + p*stride, ... + stride) along each axis",
                "probability": self.probability_source, "class": self.cls, "top_n": self.top,
                "scores": self.scores.tolist(), "top": top,
                "outputs": {name: {"channels": int(v.shape[0]), "map_size": list(v.shape[1:]),
                                   "geometry": self.prep.maps[name].to_dict(),
                                   "probabilities": is_probability(v), "scores": v.tolist()}
                            for name, v in self.outputs.items()},
                "png": None if png is None else {"path": png, "zoom": zoom, "image_box": [0, 0, pw, ph]}}


def is_probability(scores: np.ndarray) -> bool:
    """Whether ``scores`` [classes, ...] are probabilities over the class axis
    already (a Softmax's output): in [0, 1] and summing to 1 at every position."""
    s = scores.astype(np.float64)
    return bool(s.size and np.all((s >= 0) & (s <= 1)) and np.allclose(s.sum(axis=0), 1.0, atol=1e-3))


def probabilities(scores: np.ndarray) -> tuple[np.ndarray, str]:
    """``scores`` [classes, ...] as probabilities over the class axis."""
    s = scores.astype(np.float64)
    if is_probability(s):
        return s, "model output"
    e = np.exp(s - s.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True), "softmax of the scores"


def choose(outputs: dict, named: str | None = None) -> tuple[str, str]:
    """The output to draw and why: the one ``named``, else the first whose
    values are probabilities over their class axis (more than one class),
    else the only one."""
    if named is not None:
        return named, "named with --output"
    for name, v in outputs.items():
        if v.shape[0] > 1 and is_probability(v):
            return name, "its values are probabilities over its class axis"
    if len(outputs) == 1:
        return next(iter(outputs)), "the only score map"
    raise Fc2ConvError(f"the model has {len(outputs)} score-map outputs ({', '.join(map(repr, outputs))}) and "
                       "none holds probabilities over its class axis; name the one to draw with --output NAME")


def heatmap(model, image, *, cls: int | None = None, top: int | None = None, output: str | None = None,
            scale=1 / 255, mean=None, std=None, size=None, dense_stride: int | None = None, provider: str = "cpu",
            input_shapes=None, labels=None, progress=None) -> Heatmap:
    """Run ``model`` (made dense unless it is) once on ``image`` and return its score maps.

    Args:
        model: a path or an ``onnx.ModelProto``: a classifier with FC layers, or a dense model.
        image: a PNG/JPEG path, gray or RGB as the model's input wants.
        cls: draw P(class ``cls``) with a colour scale; else ``top`` (default 1) classes per position.
        output: the output to draw (default: the one holding class probabilities, or the only one);
            every score-map output is computed either way.
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
    prep = prepare(model, dense_stride=dense_stride, input_shapes=input_shapes, output=output)
    mean_v = parse_channels(mean, "--mean", prep.channels)
    std_v = parse_channels(std, "--std", prep.channels)
    hw = tuple(size) if size else image_size(image, model)
    if hw is not None and provider == "cpu":   # (a GPU's memory is not this machine's: its allocation error says)
        check_memory(prep, *hw, model, image)
    pixels = read_image(image, prep.channels, size, model)
    x = preprocess(pixels, prep, scale, mean_v, std_v)
    h, w = pixels.shape[:2]
    progress(f"running the dense model on {h}x{w} pixels ({provider})")
    from .check.run import session

    sess = session(prep.model, provider, "the dense model")
    names = list(prep.maps)
    try:
        values = sess.run(names, {prep.input: x})
    except Exception as exc:  # onnxruntime's message says which dim does not fit
        why = _out_of_memory(exc)
        if why:
            raise too_large(f"{image}: onnxruntime ran out of memory running the dense model on this {h}x{w} "
                            f"image ({why})", model, image) from None
        g = prep.maps[output or names[0]]
        rf = "x".join(str(a.receptive_field) for a in g.axes)
        raise Fc2ConvError(f"{image}: onnxruntime cannot run the dense model on this {h}x{w} image "
                           f"(is it smaller than the model's {rf} window?): {str(exc).splitlines()[0]}") from None
    outputs = {}
    for name, out in zip(names, values):
        if out.ndim != 4 or out.shape[0] != 1 or min(out.shape[2:]) < 1:
            raise Fc2ConvError(f"{image}: the {h}x{w} image gives output {name!r} the shape {list(out.shape)}; "
                               "it must be at least the model's native input size")
        outputs[name] = out[0]
    drawn, why = choose(outputs, output)
    classes = outputs[drawn].shape[0]
    if cls is not None and not 0 <= cls < classes:
        raise Fc2ConvError(f"--class {cls}: the model has classes 0..{classes - 1}")
    if top is not None and top > classes:
        raise Fc2ConvError(f"--top {top}: the model has only {classes} classes")
    probs, source = probabilities(outputs[drawn])
    return Heatmap(pixels, outputs, drawn, why, probs, source, prep, str(image),
                   str(model) if isinstance(model, (str, os.PathLike)) else "", cls,
                   1 if cls is None and top is None else (top or 1), list(labels or []),
                   {"scale": scale, "mean": mean_v.tolist(), "std": std_v.tolist(),
                    "size": list(size) if size else None})


def _out_of_memory(exc: BaseException) -> str:
    """What failed, when onnxruntime's error is a failed allocation (its CPU
    arena's or CUDA's); "" otherwise."""
    if isinstance(exc, MemoryError):
        return "MemoryError"
    text = " ".join(str(exc).split())
    low = text.lower()
    for key in ("failed to allocate", "bad_alloc", "bad allocation", "out of memory", "cannot allocate memory"):
        at = low.find(key)
        if at >= 0:
            return text[at:at + 120]
    return ""


def read_labels(path) -> list[str]:
    """Class names, one a line (heatmap's and scan's --labels)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Fc2ConvError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Fc2ConvError(f"{path}: cannot read the labels: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
