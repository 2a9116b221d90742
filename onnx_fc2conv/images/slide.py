"""Whole-slide images through OpenSlide (the ``wsi`` extra: openslide-python
and openslide-bin), for `scan`.

OpenSlide reads Aperio (.svs), Hamamatsu (.ndpi, .vms, .vmu), MIRAX (.mrxs),
Leica (.scn), Ventana (.bif), Philips TIFF and generic tiled TIFF by region:
``read_region`` decodes only the tiles a region touches. A ``.tif`` comes
here only when asked (``open_image(path, reader="openslide")``); tifffile
reads it otherwise (see images/__init__.py).

Levels: OpenSlide's levels, level 0 the full resolution. ``read_region``
takes its origin in level-0 pixels, so a region ``(y, x)`` of level ``L`` is
read at ``round(x·d), round(y·d)`` with ``d`` the level's downsample (an
exact integer in the usual pyramids of 2 or 4).

Pixels: OpenSlide returns RGBA with the alpha not premultiplied; alpha is 0
outside the scanned area. The alpha is dropped after compositing over the
slide's background colour (``openslide.background-color``, white when the
file names none): ``rgb·a + background·(1 − a)`` with ``a = alpha/255``,
which leaves opaque pixels exactly as stored.
"""

from __future__ import annotations

import numpy as np

from .base import Fc2ConvError, Image, check_level, require


class SlideImage(Image):
    """One level of a slide, RGB uint8."""

    channels = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path, level: int = 0, spatial_rank: int = 2):
        openslide = require("openslide", "wsi")
        self.path = str(path)
        if spatial_rank != 2:
            raise Fc2ConvError(f"{path}: a slide has 2 spatial axes, the model's input has {spatial_rank}")
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as exc:
            raise Fc2ConvError(f"{path}: not a slide OpenSlide can read ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.level_shapes = tuple((int(h), int(w)) for w, h in self._slide.level_dimensions)
        self.levels = len(self.level_shapes)
        try:
            check_level(path, level, self.level_shapes)
        except Fc2ConvError:
            self._slide.close()
            raise
        self.level = level
        self.shape = self.level_shapes[level]
        self.vendor = self._slide.properties.get("openslide.vendor")
        self._downsample = float(self._slide.level_downsamples[level])
        props = self._slide.properties
        tile = (props.get(f"openslide.level[{level}].tile-height"), props.get(f"openslide.level[{level}].tile-width"))
        self.chunk = tuple(int(t) for t in tile) if all(tile) else None
        colour = self._slide.properties.get("openslide.background-color") or "ffffff"
        self._background = np.array([int(colour[k:k + 2], 16) for k in (0, 2, 4)], np.float32)
        self._reopen = (open, (self.path, level, spatial_rank))

    def open_level(self, level: int) -> "SlideImage":
        check_level(self.path, level, self.level_shapes)
        return self if level == self.level else SlideImage(self.path, level, 2)

    def _read(self, box) -> np.ndarray:
        (y0, y1), (x0, x1) = box
        origin = (round(x0 * self._downsample), round(y0 * self._downsample))
        rgba = np.asarray(self._slide.read_region(origin, self.level, (x1 - x0, y1 - y0)))
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        a = alpha.astype(np.float32) / 255
        return np.rint(rgb * a + self._background * (1 - a)).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


def open(path, level: int = 0, spatial_rank: int = 2) -> SlideImage:  # noqa: A001 - the format modules' entry point
    return SlideImage(path, level, spatial_rank)
