"""Readers for `scan`: ``open_image(path)`` picks the reader by the file's
suffix (see base.py for what a reader is). Format libraries are imported only
when their format is opened, so the package works without the ``scan`` extra
until an image of that kind is read.

Which reader a file gets (``FORMATS``): PNG/JPEG and Pillow's other formats
-> ``pil``; ``.tif``/``.tiff``/BigTIFF -> ``tiff`` (tifffile); whole-slide
formats -> ``slide`` (OpenSlide, the ``wsi`` extra); a ``.zarr`` folder ->
``zarrarray``; ``.npy`` -> memory-mapped. A ``.tif`` goes to tifffile by
default, which reads plain, tiled, striped and pyramidal TIFFs (and OME-TIFF)
region by region; ``reader="openslide"`` sends it to OpenSlide instead, for
a slide saved as ``.tif`` that only OpenSlide understands (Philips TIFF,
Ventana, a generic tiled TIFF OpenSlide reads as ``generic-tiff``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from ..errors import Fc2ConvError
from .base import ArrayImage, Image, open_npy, region_label

# suffix -> module of this package that opens it (its ``open(path, level, spatial_rank) -> Image``)
FORMATS = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm",
                     ".pnm", ".tga", ".jp2", ".j2k"), "pil"),
    **dict.fromkeys((".tif", ".tiff", ".btf", ".tf8", ".tf2"), "tiff"),
    **dict.fromkeys((".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"), "slide"),
    ".zarr": "zarrarray",
}
# reader name (open_image's ``reader=``, scan's option) -> module
READERS = {"pillow": "pil", "tifffile": "tiff", "openslide": "slide", "zarr": "zarrarray"}


def open_image(src, *, level: int = 0, spatial_rank: int = 2, reader: str | None = None) -> Image:
    """An :class:`Image` for ``src``: an ndarray, a ``.npy`` file (memory-mapped),
    or a file whose suffix is in ``FORMATS``. ``reader`` (a key of ``READERS``)
    overrides the choice by suffix, e.g. ``"openslide"`` for a slide saved as ``.tif``."""
    if isinstance(src, Image):
        return src
    if isinstance(src, np.ndarray):
        return ArrayImage(src, spatial_rank)
    path = Path(src)
    if not path.exists():
        raise Fc2ConvError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if reader is not None:
        module = READERS.get(reader)
        if module is None:
            raise Fc2ConvError(f"unknown image reader {reader!r}; choose one of {', '.join(READERS)}")
    elif suffix == ".npy":
        return open_npy(path, level, spatial_rank)
    else:
        module = FORMATS.get(suffix)
        if module is None and any(p.suffix.lower() == ".zarr" for p in path.parents):
            module = "zarrarray"  # an array inside a zarr group: folder.zarr/name
        if module is None:
            known = ", ".join(sorted({".npy", *FORMATS}))
            raise Fc2ConvError(f"{path}: unknown image format {suffix or '(no suffix)'!r}; scan reads {known}")
    return importlib.import_module(f"{__name__}.{module}").open(path, level, spatial_rank)


__all__ = ["ArrayImage", "FORMATS", "READERS", "Image", "open_image", "region_label"]
