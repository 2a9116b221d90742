"""PNG, JPEG and Pillow's other formats, for `scan`.

PNG and JPEG are compressed as one stream (rows depend on the rows before
them), so Pillow can only decode them whole: the first region read decodes
the image once and keeps the pixels for the following reads. That costs
``H·W·C`` bytes of memory, acceptable for the sizes people save as
PNG/JPEG; the large formats (tiled TIFF, slides, zarr) are read region by
region. Opening reads only the header, so size, channels and dtype are known
before anything is decoded.

Uncompressed files (BMP, PPM/PGM, uncompressed TGA) are the exception where
Pillow allows a region: their header (``im.tile``, one ``raw`` tile) gives
the pixel data's offset, row stride, byte layout and row order, so the file
is memory-mapped and a region read touches only its own rows and columns
(``RAW``; a layout not in the table is decoded whole like PNG).

Pillow refuses images above ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels)
as possible decompression bombs. A scan is asked for a large image on
purpose, so this module lifts the limit while it opens and decodes, and puts
the previous value back afterwards (``heatmap``, which decodes whole images
into one model pass, keeps it).

Pixels: ``L``/``1`` -> 1 channel uint8; ``I;16`` (16-bit PNG, 16-bit PGM) -> uint16;
``I`` -> int32; ``F`` -> float32; ``LA`` -> 1 channel and ``RGBA``/``RGBX``
-> 3 channels with the alpha (4th) band dropped; palette and other colour
spaces are converted to RGB (or RGBA, then dropped) by Pillow. Pillow has
no 16-bit colour mode (it would give 8 bits), so a 16-bit RGB/RGBA PNG is
decoded by imagecodecs (the ``scan`` extra) into uint16.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

from .base import Fc2ConvError, Image, check_level, require

log = logging.getLogger(__name__)

# mode -> (mode to convert to before reading, channels kept, dtype)
MODES = {
    "1": ("L", 1, np.uint8), "L": (None, 1, np.uint8), "LA": (None, 1, np.uint8), "La": ("LA", 1, np.uint8),
    "I;16": (None, 1, np.uint16), "I;16L": (None, 1, np.uint16), "I;16B": (None, 1, np.uint16),
    "I": (None, 1, np.int32), "F": (None, 1, np.float32),
    "RGB": (None, 3, np.uint8), "RGBA": (None, 3, np.uint8), "RGBa": ("RGBA", 3, np.uint8),
    "RGBX": (None, 3, np.uint8),
}


# Pillow raw mode -> (numpy dtype of one sample in the file, samples per pixel, samples kept in RGB order)
RAW = {
    "L": ("u1", 1, [0]), "RGB": ("u1", 3, [0, 1, 2]), "BGR": ("u1", 3, [2, 1, 0]),
    "RGBX": ("u1", 4, [0, 1, 2]), "RGBA": ("u1", 4, [0, 1, 2]), "BGRX": ("u1", 4, [2, 1, 0]),
    "BGRA": ("u1", 4, [2, 1, 0]), "I;16": ("<u2", 1, [0]), "I;16L": ("<u2", 1, [0]), "I;16B": (">u2", 1, [0]),
}
PNG16_COLOUR = "png16"   # _convert value: decode with imagecodecs


def _png16_colour(path) -> bool:
    """A PNG whose IHDR says 16 bits per sample, colour type RGB (2) or RGBA (6)."""
    with Path(path).open("rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] in (2, 6)


def _raw_rows(pil, path):
    """``(rows, keep, dtype, bottom_up)``: the memory-mapped pixel rows of an uncompressed
    file ``[rows, width, samples]``, or None when Pillow's header is not one plain raw tile."""
    tile = getattr(pil, "tile", None) or []
    if len(tile) != 1 or tile[0][0] != "raw" or tuple(tile[0][1]) != (0, 0, *pil.size):
        return None
    args = tile[0][3]
    rawmode, stride, orientation = (args, 0, 1) if isinstance(args, str) else (tuple(args) + (0, 1))[:3]
    if rawmode not in RAW:
        return None
    sample, samples, keep = RAW[rawmode]
    width, height = pil.size
    pixel = np.dtype(sample).itemsize * samples
    stride = stride or width * pixel
    offset = int(tile[0][2])
    if stride < width * pixel or stride % np.dtype(sample).itemsize:
        return None
    complete = max(0, (Path(path).stat().st_size - offset) // stride)  # a truncated file has fewer rows
    if complete == 0:
        return None
    data = np.memmap(path, np.uint8, "r", offset, (min(complete, height) * stride,))
    rows = np.lib.stride_tricks.as_strided(data.view(sample), (min(complete, height), width, samples),
                                           (stride, pixel, np.dtype(sample).itemsize))
    return rows, keep, np.dtype(sample).newbyteorder("="), orientation == -1


@contextlib.contextmanager
def no_bomb_limit(PIL_Image):
    """Lift Pillow's decompression-bomb limit for one open/decode, then restore it."""
    saved = PIL_Image.MAX_IMAGE_PIXELS
    PIL_Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        PIL_Image.MAX_IMAGE_PIXELS = saved


class PilImage(Image):
    """One frame (the first) of a file Pillow reads; decoded whole on first read."""

    def __init__(self, path, level: int = 0, spatial_rank: int = 2):
        self._PIL = require("PIL.Image", "scan")
        self.path = str(path)
        if spatial_rank != 2:
            raise Fc2ConvError(f"{path}: a picture has 2 spatial axes, the model's input has {spatial_rank}")
        try:
            with no_bomb_limit(self._PIL):
                self._pil = self._PIL.open(path)
        except Exception as exc:
            raise Fc2ConvError(f"{path}: not an image Pillow can read ({type(exc).__name__})") from None
        width, height = self._pil.size
        self.shape = (int(height), int(width))
        check_level(path, level, (self.shape,))
        mode = self._pil.mode
        if mode not in MODES:  # palette, CMYK, YCbCr, LAB, HSV, PA: let Pillow make colours of them
            has_alpha = mode == "PA" or "transparency" in self._pil.info
            self._convert, self.channels, dtype = ("RGBA" if has_alpha else "RGB"), 3, np.uint8
        else:
            self._convert, self.channels, dtype = MODES[mode]
        if self._pil.format == "PNG" and _png16_colour(path):
            self._convert, self.channels, dtype = PNG16_COLOUR, 3, np.uint16
        self._raw = _raw_rows(self._pil, path) if self._convert is None or mode == "RGBX" else None
        if self._raw is not None:
            self.channels, dtype = len(self._raw[1]), self._raw[2]
        self.dtype = np.dtype(dtype)
        self._pixels = None
        self._lock = threading.Lock()   # threads of one scan share the single decode
        self._reopen = (open, (self.path, level, spatial_rank))

    def _decode(self) -> np.ndarray:
        with self._lock:
            return self._decode_once()

    def _decode_once(self) -> np.ndarray:
        if self._pixels is None:
            log.info("%s: decoding the whole %dx%d image once (Pillow cannot decode a region of it)",
                     self.path, *self.shape)
            if self._convert == PNG16_COLOUR:
                pixels = require("imagecodecs", "scan").png_decode(Path(self.path).read_bytes())
            else:
                with no_bomb_limit(self._PIL):
                    img = self._pil.convert(self._convert) if self._convert else self._pil
                    pixels = np.asarray(img)
            if pixels.ndim == 2:
                pixels = pixels[..., None]
            self._pixels = np.ascontiguousarray(pixels[..., :self.channels].astype(self.dtype, copy=False))
            self._pil.close()
        return self._pixels

    def _read(self, box) -> np.ndarray:
        (y0, y1), (x0, x1) = box
        if self._raw is None:
            return self._decode()[y0:y1, x0:x1]
        rows, keep, dtype, bottom_up = self._raw
        height = self.shape[0]
        first, last = (height - y1, height - y0) if bottom_up else (y0, y1)   # file rows
        if last > len(rows):
            raise EOFError(f"the file ends after {len(rows)} of {height} rows")
        region = rows[first:last, x0:x1][:, :, keep]
        return np.ascontiguousarray(region[::-1] if bottom_up else region, dtype=dtype)

    def close(self) -> None:
        self._pil.close()
        self._pixels = self._raw = None


def open(path, level: int = 0, spatial_rank: int = 2) -> PilImage:  # noqa: A001 - the format modules' entry point
    return PilImage(path, level, spatial_rank)
