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
"""

from __future__ import annotations

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
