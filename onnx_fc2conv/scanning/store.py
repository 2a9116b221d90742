"""The scan's output: a zarr (v3) group on disk.

One float32 array per scanned model output, named after it, shaped
``[classes, *map]`` (the batch axis dropped) and chunked by tile, so each
tile writes exactly one chunk of each array and no two tiles share a chunk
(parallel writers never touch the same file). Positions not computed yet hold
NaN.

A tile is written whole or not at all: its chunks first, then its flag in the
``tiles_done`` array (one uint8 per tile, one chunk per flag). A scan killed
between the two leaves the flag unset, and ``--resume`` computes that tile
again; a flag is only ever set after every chunk of its tile is on disk.

The group's attributes say what the map is (``ATTR``): the model (path and
sha256), the image (path, size, level), the preprocessing, the tile, the
geometry per axis (stride, receptive field, offset in image pixels at the
scanned level) and the outputs' shapes. ``--resume`` continues only a scan
whose attributes match the new request.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ..errors import Fc2ConvError

ATTR = "onnx_fc2conv_scan"
DONE = "tiles_done"
FORMAT = 1
# attributes a resumed scan must share with the scan it continues
SAME_ON_RESUME = ("model_sha256", "image", "preprocessing", "tile", "geometry", "outputs", "dense_stride")


ZARR_PYTHON = (3, 11)   # zarr 3 needs Python 3.11 or newer


def python_version() -> tuple:
    """This interpreter's (major, minor); a function so tests can pretend another."""
    return tuple(sys.version_info[:2])


def zarr():
    """zarr 3, or the one line that says what to do (the extra; Python 3.11+ when that is why it is missing)."""
    try:
        import zarr as z
    except ImportError:
        z = None
    if z is not None and int(z.__version__.split(".")[0]) >= 3:
        return z
    py = python_version()
    if py < ZARR_PYTHON:
        have = "zarr is not installed" if z is None else f"zarr {z.__version__} is installed"
        raise Fc2ConvError(f"scan needs zarr 3, which needs Python >= 3.11 (this is Python {py[0]}.{py[1]}; {have}): "
                           "run scan under Python 3.11 or newer, after pip install 'onnx-fc2conv[scan]' there")
    if z is None:
        raise Fc2ConvError("scan needs the 'scan' extra (zarr, tifffile, dask[distributed], tqdm): "
                           "pip install 'onnx-fc2conv[scan]'")
    raise Fc2ConvError(f"scan writes zarr v3 groups and needs zarr>=3 (installed: {z.__version__}): "
                       "pip install -U 'zarr>=3'")


def is_scan(path) -> bool:
    """Whether ``path`` is a group this tool wrote (only such a folder is ever replaced)."""
    meta = Path(path) / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return doc.get("node_type") == "group" and ATTR in (doc.get("attributes") or {})


def prepare_destination(path, *, resume: bool, overwrite: bool) -> bool:
    """Check OUT before any work; returns True when an existing scan is to be resumed."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise Fc2ConvError(f"{path}: the output folder {folder} does not exist")
    if not p.exists():
        return False
    if resume:
        if not is_scan(p):
            raise Fc2ConvError(f"{path}: exists but is not a scan written by onnx-fc2conv; nothing to resume")
        return True
    if not overwrite:
        raise Fc2ConvError(f"{path}: exists; --resume computes its missing tiles, --overwrite replaces it")
    if not is_scan(p):
        raise Fc2ConvError(f"{path}: exists and is not a scan written by onnx-fc2conv; not replacing it "
                           "(remove it yourself or choose another -o)")
    return False


def create(path, attrs: dict, shapes: dict, chunks: tuple, grid: tuple, *, replace: bool = False):
    """The empty group: one NaN-filled array per output and the tile flags."""
    z = zarr()
    if replace and Path(path).exists():
        shutil.rmtree(path)
    if DONE in shapes:
        raise Fc2ConvError(f"a model output is named {DONE!r}, the name scan keeps for its tile flags")
    group = z.open_group(str(path), mode="w", zarr_format=3)
    for name, shape in shapes.items():
        group.create_array(name, shape=tuple(shape), chunks=(shape[0],) + tuple(chunks), dtype="float32",
                           fill_value=np.nan, dimension_names=["class"] + _axis_names(len(chunks)))
    group.create_array(DONE, shape=tuple(grid), chunks=(1,) * len(grid), dtype="uint8", fill_value=0,
                       dimension_names=[f"tile_{n}" for n in _axis_names(len(grid))])
    group.attrs[ATTR] = attrs
    return group


def _axis_names(k: int) -> list:
    return {1: ["x"], 2: ["y", "x"], 3: ["z", "y", "x"]}.get(k, [f"axis{i}" for i in range(k)])


def open_existing(path, attrs: dict):
    """The group to resume, after checking it is the same scan."""
    z = zarr()
    group = z.open_group(str(path), mode="r+")
    have = dict(group.attrs).get(ATTR) or {}
    for key in SAME_ON_RESUME:
        if _norm(have.get(key)) != _norm(attrs.get(key)):
            raise Fc2ConvError(f"{path}: cannot resume: its {key.replace('_', ' ')} differs from this scan's "
                               f"({_short(have.get(key))} there, {_short(attrs.get(key))} now); "
                               "use --overwrite to start again")
    return group


def _norm(v):
    return json.loads(json.dumps(v))


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def done_flags(group) -> np.ndarray:
    return np.asarray(group[DONE][...]).astype(bool)


def read_attrs(path) -> dict:
    z = zarr()
    return dict(z.open_group(str(path), mode="r").attrs)[ATTR]
