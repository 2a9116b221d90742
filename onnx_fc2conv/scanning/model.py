"""The dense model a scan runs, and what it needs to feed and read it.

A classifier is made dense here (``api.convert(dense=True)``, as ``heatmap``
does); a model that is dense already is used as it is. Either way the
geometry the tiling needs is traced on the model that runs, at the image's
own size: ``auto_pad=SAME`` pads by an amount that depends on the size, so
the offset does too, and ONNX shape inference at that size gives the one-pass
map size without running it.

A pool that the dense form keeps global (squeeze-excitation) makes every
position depend on the whole image: no tiling can be exact, so it is refused
by name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..errors import Fc2ConvError
from ..geometry import MapAxis

log = logging.getLogger(__name__)


@dataclass
class DenseModel:
    """The dense model as bytes (what workers load), and how to feed it."""
    data: bytes
    input: str
    channels_last: bool
    spatial_axes: tuple          # input axes that are spatial, in order
    channels: int
    elem_type: int
    outputs: tuple               # the score maps scanned
    converted: bool              # False: the model was dense already
    sha256: str                  # of the model as given (file bytes, or the serialized proto)
    dense_stride: int | None = None
    source: str | None = None
    original: object = field(default=None, repr=False)   # path or proto of the classifier (--check's windows)
    input_shapes: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return len(self.spatial_axes)

    @property
    def np_dtype(self):
        return helper.tensor_dtype_to_np_dtype(self.elem_type)

    def proto(self) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.ParseFromString(self.data)
        return m


@dataclass(frozen=True)
class MapAt:
    """The geometry and map shapes at one image size."""
    axes: tuple                  # MapAxis per spatial axis
    shapes: dict                 # output -> [classes, *map]


def prepare(model, *, dense_stride: int | None = None, input_shapes=None) -> DenseModel:
    from .. import api

    is_path = isinstance(model, (str, os.PathLike))
    result = api.convert(model, dense=True, input_shapes=input_shapes, dense_stride=dense_stride,
                         keep_global_pools=True)
    converted = bool(result.heads)
    digest = sha256_of(model) if is_path else hashlib.sha256(model.SerializeToString()).hexdigest()
    dense = result.model
    if not converted and dense_stride:
        from .. import atrous

        dense = atrous.apply(dense, None, dense_stride).model
    inits = {t.name for t in dense.graph.initializer}
    inputs = [i for i in dense.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise Fc2ConvError(f"scan feeds one image input; the model has {len(inputs)} "
                           f"({', '.join(repr(i.name) for i in inputs)})")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    rank = len(dims) - 2
    if rank < 1:
        raise Fc2ConvError(f"input {inp.name!r} has rank {len(dims)}; scan needs [N, C, *spatial] or [N, *spatial, C]")
    # which input axes are spatial: from a trace at a small concrete size
    geo = _trace(dense, inp.name, _probe_dims(dense, inp), converted)
    axes = sorted({a.input_axis for g in geo.values() for a in g.values()})
    if axes == list(range(2, 2 + rank)):
        channels_last, channel_axis = False, 1
    elif axes == list(range(1, 1 + rank)):
        channels_last, channel_axis = True, len(dims) - 1
    else:
        raise Fc2ConvError(f"input {inp.name!r}: the score maps trace back to its axes {axes}, which are not "
                           f"the spatial axes of [N, C, *spatial] or [N, *spatial, C]")
    c_dim = dims[channel_axis]
    if not c_dim.HasField("dim_value"):
        raise Fc2ConvError(f"input {inp.name!r} has no fixed channel count; give it with --input-shape")
    if dims[0].HasField("dim_value") and dims[0].dim_value != 1:
        raise Fc2ConvError(f"input {inp.name!r} has a fixed batch of {dims[0].dim_value}; scan feeds one tile "
                           "at a time (batch 1)")
    return DenseModel(dense.SerializeToString(), inp.name, channels_last, tuple(axes), int(c_dim.dim_value),
                      inp.type.tensor_type.elem_type, tuple(geo), converted, digest, dense_stride,
                      os.fspath(model) if is_path else None, model if converted else None,
                      dict(result.input_shapes))


def _probe_dims(model, inp) -> list:
    """A concrete input shape big enough to trace: the fixed dims as they are, 256 for free ones."""
    return [d.dim_value if d.HasField("dim_value") else (1 if i == 0 else 256)
            for i, d in enumerate(inp.type.tensor_type.shape.dim)]


def _trace(model, name: str, dims, converted: bool) -> dict:
    """output -> {axis: geometry.Axis} for every output whose spatial axes trace to the image input."""
    from .. import shapes as shapes_mod
    from ..geometry import trace
    from ..graph import GraphIndex

    idx = GraphIndex(model)
    infos = shapes_mod.infer(model, {name: list(dims)})
    outputs = [o.name for o in model.graph.output]
    # A model we made dense was traced strictly by convert; its rewritten
    # Reshapes read Shape(x) and need the lenient pass. A model given dense is
    # traced strictly: an op that mixes positions must be refused here.
    tr = trace(idx, infos, outputs, keep_global=True, lenient=converted)
    if tr.kept_global:
        op_of = {n.name: n.op_type for n in model.graph.node}
        named = ", ".join(f"{op_of.get(k, 'pool')} {k!r}" for k in tr.kept_global[:3])
        raise Fc2ConvError(f"the model's dense form keeps {named} global over the whole image, so every position "
                           "depends on the whole image and no tiling can be exact; scan refuses it")
    out = {}
    for o in outputs:
        g = tr.geo.get(o) or {}
        if g and sorted(g) == list(range(2, 2 + len(g))) and all(a.input == name for a in g.values()):
            out[o] = g
    if not out:
        raise Fc2ConvError("the model has no FC head to make dense and no output that is a score map "
                           "[N, classes, *spatial] of its image input; scan needs an image classifier")
    first = next(iter(out.values()))
    for o, g in out.items():
        if [(a.stride, a.receptive_field, a.offset) for a in g.values()] != \
                [(a.stride, a.receptive_field, a.offset) for a in first.values()]:
            raise Fc2ConvError(f"the score maps {', '.join(map(repr, out))} have different geometries "
                               "(stride, receptive field, offset); scan tiles maps that share one")
    return out


def at_size(dense: DenseModel, sizes) -> MapAt:
    """Geometry (offset at this size) and one-pass map shapes for an image of ``sizes``."""
    from .. import shapes as shapes_mod

    model = dense.proto()
    dims = [1] * (dense.rank + 2)
    for ax, n in zip(dense.spatial_axes, sizes):
        dims[ax] = int(n)
    dims[len(dims) - 1 if dense.channels_last else 1] = dense.channels
    geo = _trace(model, dense.input, dims, dense.converted)
    g = geo[dense.outputs[0]]
    small = [(n, a) for n, a in zip(sizes, (g[k] for k in sorted(g))) if n < a.receptive_field + 2 * a.offset]
    if small:
        raise Fc2ConvError(f"the image ({'x'.join(map(str, sizes))} px) is smaller than the model's window "
                           f"({'x'.join(str(a.receptive_field + 2 * a.offset) for a in (g[k] for k in sorted(g)))}"
                           " px): the map has no position")
    infos = shapes_mod.infer(model, {dense.input: dims})
    shapes = {}
    for o in dense.outputs:
        shape = infos[o].shape if o in infos and infos[o].shape is not None else None
        if shape is None or not all(isinstance(d, int) for d in shape) or len(shape) != dense.rank + 2:
            raise Fc2ConvError(f"shape inference cannot tell the size of output {o!r} at input size "
                               f"{'x'.join(map(str, sizes))}; scan needs it to lay out the map")
        shapes[o] = [int(d) for d in shape[1:]]
    axes = tuple(MapAxis(a.input, a.input_axis, a.stride, a.receptive_field, a.offset)
                 for a in (g[k] for k in sorted(g)))
    return MapAt(axes, shapes)


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------- pixels ---

@dataclass(frozen=True)
class Preprocessing:
    """``x = (pixels * scale - mean) / std`` per channel."""
    scale: float
    mean: tuple
    std: tuple

    def to_dict(self) -> dict:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std),
                "formula": "x = (pixels * scale - mean) / std per channel"}


def channels_of(image_channels: int, model_channels: int, what: str) -> int:
    """How many of the image's channels feed the model (alpha dropped)."""
    if image_channels == model_channels:
        return model_channels
    if (image_channels, model_channels) in ((4, 3), (2, 1)):
        return model_channels
    kind = {1: "a grayscale image", 2: "a grayscale image with alpha", 3: "an RGB image",
            4: "an RGBA image"}.get(image_channels, f"an image of {image_channels} channels")
    raise Fc2ConvError(f"{what}: {kind}, but the model's input has {model_channels} channel"
                       f"{'s' if model_channels != 1 else ''}")


def to_input(pixels: np.ndarray, dense: DenseModel, prep: Preprocessing) -> np.ndarray:
    """Pixels ``[*sizes, C]`` as one batch in the model's layout and dtype.

    Where the model computes in float32/float64, the pixels are cast straight
    into the model's layout and scaled in place, then each channel's plane
    has its mean subtracted and is divided by its std, each skipped where it
    changes nothing (``x - 0`` and ``x / 1`` are exact): the same float
    operations in the same order as the general path below, so the same bits,
    in two to four passes over the tile (5x faster on 8-bit RGB than the
    former 256-entry table, where np.take widened every index to int64)."""
    dtype = dense.np_dtype
    work = np.float64 if dtype == np.float64 else np.float32
    if dtype == work and pixels.dtype.kind in "uif":
        source = pixels[..., :dense.channels]
        out = np.empty((1,) + (source.shape if dense.channels_last else
                               (dense.channels,) + source.shape[:-1]), dtype)
        np.copyto(out[0], source if dense.channels_last else np.moveaxis(source, -1, 0), casting="unsafe")
        np.multiply(out, work(prep.scale), out=out)
        for c in range(dense.channels):
            plane = out[0, ..., c] if dense.channels_last else out[0, c]
            if prep.mean[c] != 0:
                np.subtract(plane, work(prep.mean[c]), out=plane)
            if prep.std[c] != 1:
                np.divide(plane, work(prep.std[c]), out=plane)
        return out
    x = pixels[..., :dense.channels].astype(work)
    x *= work(prep.scale)
    x -= np.asarray(prep.mean, work)
    x /= np.asarray(prep.std, work)
    if not dense.channels_last:
        x = np.moveaxis(x, -1, 0)
    return np.ascontiguousarray(x[None], dtype=dtype)
