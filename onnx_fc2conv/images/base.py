"""What `scan` reads: an image as regions, never whole.

An :class:`Image` has a spatial shape (``(H, W)`` for pictures; ``(L,)`` or
``(D, H, W)`` for arrays of that rank), a number of channels (always the last
axis of what :meth:`Image.read` returns; 1 for a channel-less array), and a
dtype. ``read(box)`` returns the pixels of ``box`` (one ``(start, stop)``
pair per spatial axis, inside the image) as ``[*sizes, channels]``. A region
that cannot be read raises :class:`Fc2ConvError` naming the image and the
region; nothing else is read ahead.

Every format module (``images.pil``, ``images.tiff``, ...) imports only this
module; ``images/__init__.py`` chooses the module by the file's suffix.

Pyramids: ``level_shapes[k]`` is the spatial shape of level ``k`` (level 0
is the full resolution); an Image is one level, and :meth:`Image.open_level`
opens another level of the same file.

Overview: :meth:`Image.downsampled` returns the whole image shrunk by one
integer factor ``f = ceil(max(shape) / max_side)`` on every axis: output
pixel ``p`` is the mean of the input pixels in the box ``[p·f, (p+1)·f)``
(the last box on an axis is cut at the border and averaged over the pixels
it has). It reads region by region (at most ``BLOCK`` pixels a side, a
multiple of ``f``), so its memory is a few blocks plus the output; where the
file has a pyramid, it starts from the coarsest level still at least
``max_side`` on its longest side, whose shape the factor then refers to.
"""

from __future__ import annotations

import importlib
import math

import numpy as np

from ..errors import Fc2ConvError


class Image:
    """Base of every reader: subclasses set the attributes and ``_read``."""
    path: str | None = None
    shape: tuple = ()
    channels: int = 1
    dtype: np.dtype = np.dtype(np.uint8)
    level: int = 0
    levels: int = 1
    level_shapes: tuple = ()   # spatial shape of every level, level 0 first; () for one level
    chunk: tuple | None = None  # the file's unit of reading (tile, strip, zarr chunk), spatial; None if unknown

    def open_level(self, level: int) -> "Image":
        """The same file at pyramid level ``level`` (``self`` for this level).
        Readers of pyramids override it; the caller closes what it opened."""
        check_level(self.path, level, self.level_shapes or (self.shape,))
        return self

    def downsampled(self, max_side: int) -> np.ndarray:
        """The whole image at most ``max_side`` pixels a side, ``[*sizes, channels]``
        in this image's dtype, for an overview picture (see the module docstring).
        The scale from a returned pixel to this level's pixels is
        ``self.shape[k] / result.shape[k]`` per axis (up to the last box's cut)."""
        if int(max_side) < 1:
            raise ValueError(f"max_side must be at least 1, got {max_side}")
        max_side = int(max_side)
        shapes = self.level_shapes or (self.shape,)
        pick = self.level
        for k in range(self.level + 1, len(shapes)):
            if max(shapes[k]) >= max_side and math.prod(shapes[k]) < math.prod(shapes[pick]):
                pick = k
        src = self.open_level(pick) if pick != self.level else self
        try:
            return _box_mean(src, -(-max(src.shape) // max_side))
        finally:
            if src is not self:
                src.close()

    def __reduce_ex__(self, protocol):
        # A reader travels to a dask worker as (its open function, path, level,
        # rank) and reopens there: a file handle or a decoded image does not.
        reopen = getattr(self, "_reopen", None)
        return reopen if reopen is not None else super().__reduce_ex__(protocol)

    def read(self, box) -> np.ndarray:
        box = tuple((int(a), int(b)) for a, b in box)
        if len(box) != len(self.shape) or any(not 0 <= a < b <= n for (a, b), n in zip(box, self.shape)):
            raise ValueError(f"region {box} is not inside the image of shape {self.shape}")
        try:
            out = self._read(box)
        except Fc2ConvError:
            raise
        except Exception as exc:  # a truncated or corrupt file fails here, in the format library
            raise Fc2ConvError(f"{self.path or 'the image'}: cannot read region {region_label(box)}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return out

    def _read(self, box) -> np.ndarray:  # pragma: no cover - every reader defines it
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


BLOCK = 2048  # the largest side of one region read by downsampled()


def _box_mean(image: Image, f: int) -> np.ndarray:
    """``image`` shrunk by ``f`` on every spatial axis, box means, read block by block."""
    shape = image.shape
    out_shape = tuple(-(-n // f) for n in shape)
    out = np.empty(out_shape + (image.channels,), image.dtype)
    step = max(f, BLOCK // f * f)
    for origin in np.ndindex(*(-(-n // step) for n in shape)):
        box = tuple((o * step, min(n, (o + 1) * step)) for o, n in zip(origin, shape))
        region = image.read(box)
        if f > 1:
            region = region.astype(np.float64)
            count = np.ones((), np.float64)
            for axis, (a, b) in enumerate(box):
                starts = np.arange(0, b - a, f)
                region = np.add.reduceat(region, starts, axis=axis)
                size = np.minimum(f, (b - a) - starts).astype(np.float64)
                count = count[..., None] * size if count.ndim else size
            region = region / count[..., None]
            if np.issubdtype(image.dtype, np.integer):
                info = np.iinfo(image.dtype)
                region = np.clip(np.rint(region), info.min, info.max)
        target = tuple(slice(a // f, -(-b // f)) for a, b in box)
        out[target] = region.astype(image.dtype, copy=False)
    return out


def check_level(path, level: int, level_shapes) -> None:
    """Refuse a level the file does not have, listing those it has and their sizes."""
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(level_shapes):
        have = "; ".join(f"{k}: {'x'.join(str(n) for n in s)}" for k, s in enumerate(level_shapes))
        raise Fc2ConvError(f"{path or 'the image'}: --level {level} does not exist; "
                           f"it has {len(level_shapes)} level{'s' * (len(level_shapes) != 1)} ({have})")


def require(module: str, extra: str):
    """Import a format library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # also a missing shared library behind the module
        raise Fc2ConvError(f"reading this image needs {module!r}, which is not installed ({type(exc).__name__}); "
                           f"run: pip install 'onnx-fc2conv[{extra}]'") from None
    except OSError as exc:      # openslide-python without its library
        raise Fc2ConvError(f"reading this image needs {module!r}, which could not load ({exc}); "
                           f"run: pip install 'onnx-fc2conv[{extra}]'") from None


def region_label(box) -> str:
    """``rows 0:512, cols 1024:1536`` for a 2-D box; ``axis k a:b`` otherwise."""
    names = ("rows", "cols") if len(box) == 2 else tuple(f"axis {k}" for k in range(len(box)))
    return ", ".join(f"{n} {a}:{b}" for n, (a, b) in zip(names, box))


class ArrayImage(Image):
    """An array already in memory or memory-mapped (``.npy``): spatial axes
    first, channels last when the array has one more axis than the model's
    spatial rank."""

    def __init__(self, array, spatial_rank: int, path: str | None = None):
        if array.ndim == spatial_rank:
            self._channel_axis = False
            self.channels = 1
        elif array.ndim == spatial_rank + 1:
            self._channel_axis = True
            self.channels = int(array.shape[-1])
        else:
            raise Fc2ConvError(f"{path or 'the array'}: shape {list(array.shape)} is not {spatial_rank} spatial "
                               f"axes (and an optional channel axis last) as the model's input needs")
        self._array = array
        self.path = path
        self.shape = tuple(int(d) for d in array.shape[:spatial_rank])
        self.dtype = np.dtype(array.dtype)
        self._spatial_rank = spatial_rank
        if path is not None and isinstance(array, np.memmap):
            self._reopen = (open_npy, (path, 0, spatial_rank))

    def _read(self, box) -> np.ndarray:
        region = np.array(self._array[tuple(slice(a, b) for a, b in box)])
        self._release()
        return region if self._channel_axis else region[..., None]

    def _release(self) -> None:
        """A memory-mapped file's pages, once copied out, leave this process's
        resident set (they stay in the OS page cache): without this a scan's
        RSS would grow with every region read, up to the whole file."""
        mm = getattr(self._array, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise"):
            import mmap

            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):
                pass


def open_npy(path, level: int = 0, spatial_rank: int = 2) -> ArrayImage:
    """A ``.npy`` file, memory-mapped: a region read touches only its rows."""
    if level:
        raise Fc2ConvError(f"{path}: a .npy array has one level; --level {level} does not exist")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise Fc2ConvError(f"{path}: not a readable .npy array ({type(exc).__name__})") from None
    return ArrayImage(array, spatial_rank, str(path))
