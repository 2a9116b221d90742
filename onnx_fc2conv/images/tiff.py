"""TIFF and BigTIFF (tiled or striped, pyramidal or not, OME-TIFF), for `scan`.

tifffile parses the file's directories and exposes the first series (the
image; its pyramid levels are ``series.levels``) as a zarr store
(``series.aszarr(level=L)``): a region read through zarr fetches and decodes
only the tiles or strips that intersect it, never the whole page. Striped
files decode whole strips (full width), so their memory per read is one
band of rows.

Axes: tifffile names them (``Y``, ``X``, ``S`` for samples, ``Z``, ...).
Every axis but ``S`` is spatial and must match the model's spatial rank (2
for pictures, 3 for a ``ZYX`` stack); ``S`` (first when planar, last when
contiguous) becomes the channel axis, last. Samples the file marks as alpha
(ExtraSamples 1 or 2) are dropped; a palette image is expanded to RGB
through its colour map. A region that cannot be decoded (a truncated file,
a corrupt tile) raises Fc2ConvError naming the region (base.Image.read).
"""

from __future__ import annotations

import numpy as np

from .base import Fc2ConvError, Image, check_level, require

ALPHA = (1, 2)      # ExtraSamples: associated, unassociated alpha
PALETTE = 3         # PhotometricInterpretation


def _spatial(axes: str, shape) -> tuple:
    return tuple(int(n) for a, n in zip(axes, shape) if a != "S")


class TiffImage(Image):
    """One pyramid level of the first series of a TIFF file, read through zarr."""

    def __init__(self, path, level: int = 0, spatial_rank: int = 2):
        tifffile = require("tifffile", "scan")
        zarr = require("zarr", "scan")
        require("imagecodecs", "scan")  # the codecs (LZW, JPEG, JPEG 2000, ...) behind tifffile
        self.path = str(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as exc:
            raise Fc2ConvError(f"{path}: not a readable TIFF ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        try:
            self.level_shapes = tuple(_spatial(s.axes, s.shape) for s in levels)
            self.levels = len(levels)
            check_level(path, level, self.level_shapes)
            self.level = level
            s = levels[level]
            axes = s.axes
            if len(axes.replace("S", "")) != spatial_rank:
                raise Fc2ConvError(f"{path}: the image has axes {axes} (shape {list(s.shape)}); the model's input "
                                   f"needs {spatial_rank} spatial axes (and samples S)")
            page = s.keyframe
            self._z = zarr.open_array(series.aszarr(level=level), mode="r")
        except BaseException:
            self._tif.close()
            raise
        self.shape = self.level_shapes[level]
        self._sample_axis = axes.find("S")
        samples = int(s.shape[self._sample_axis]) if self._sample_axis >= 0 else 1
        extras = tuple(int(e) for e in (page.extrasamples or ()))
        colour = samples - len(extras)
        self._keep = [k for k in range(samples) if k < colour or extras[k - colour] not in ALPHA]
        self._colormap = None
        if int(page.photometric) == PALETTE and page.colormap is not None and samples == 1:
            cmap = np.asarray(page.colormap)           # [3, 2**bits], uint16 by the TIFF spec
            self._colormap = (cmap // 257).astype(np.uint8) if cmap.max() > 255 else cmap.astype(np.uint8)
            self.channels, self.dtype = 3, np.dtype(np.uint8)
        else:
            self.channels, self.dtype = len(self._keep), np.dtype(self._z.dtype)
        self.chunk = tuple(int(c) for k, c in enumerate(self._z.chunks) if k != self._sample_axis)
        self._reopen = (open, (self.path, level, spatial_rank))

    def open_level(self, level: int) -> "TiffImage":
        check_level(self.path, level, self.level_shapes)
        return self if level == self.level else TiffImage(self.path, level, len(self.shape))

    def _read(self, box) -> np.ndarray:
        boxes = iter(box)
        index = tuple(slice(None) if k == self._sample_axis else slice(*next(boxes))
                      for k in range(self._z.ndim))
        region = np.asarray(self._z[index])
        if self._sample_axis < 0:
            region = region[..., None]
        else:
            region = np.moveaxis(region, self._sample_axis, -1)
            if len(self._keep) != region.shape[-1]:
                region = region[..., self._keep]
        if self._colormap is not None:
            region = np.moveaxis(self._colormap[:, region[..., 0]], 0, -1)
        return region

    def close(self) -> None:
        self._tif.close()


def open(path, level: int = 0, spatial_rank: int = 2) -> TiffImage:  # noqa: A001 - the format modules' entry point
    return TiffImage(path, level, spatial_rank)
