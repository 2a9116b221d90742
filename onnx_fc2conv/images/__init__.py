"""Readers for `scan`: ``open_image(path)`` picks the reader by the file's
suffix (see base.py for what a reader is). Format libraries are imported only
when their format is opened, so the package works without the ``scan`` extra
until an image of that kind is read."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from ..errors import Fc2ConvError
from .base import ArrayImage, Image, region_label

# suffix -> module of this package that opens it (its ``open(path, level, spatial_rank) -> Image``)
FORMATS = {}


def open_image(src, *, level: int = 0, spatial_rank: int = 2) -> Image:
    """An :class:`Image` for ``src``: an ndarray, a ``.npy`` file (memory-mapped),
    or a file whose suffix is in ``FORMATS``."""
    if isinstance(src, Image):
        return src
    if isinstance(src, np.ndarray):
        return ArrayImage(src, spatial_rank)
    path = Path(src)
    if not path.exists():
        raise Fc2ConvError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if level:
            raise Fc2ConvError(f"{path}: a .npy array has one level; --level {level} does not exist")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise Fc2ConvError(f"{path}: not a readable .npy array ({type(exc).__name__})") from None
        return ArrayImage(array, spatial_rank, str(path))
    module = FORMATS.get(suffix)
    if module is None:
        known = ", ".join(sorted({".npy", *FORMATS}))
        raise Fc2ConvError(f"{path}: unknown image format {suffix or '(no suffix)'!r}; scan reads {known}")
    return importlib.import_module(f"{__name__}.{module}").open(path, level, spatial_rank)


__all__ = ["ArrayImage", "FORMATS", "Image", "open_image", "region_label"]
