"""A zarr array (a ``.zarr`` folder, format v2 or v3), for `scan`.

(Named ``zarrarray`` so that it never shadows the ``zarr`` package.)

Layout as :class:`base.ArrayImage`: spatial axes first, an optional channel
axis last; a region read fetches only the chunks it intersects. An array
carries no colour metadata, so every channel is kept (a 4th channel is not
taken for alpha).

The folder may hold the array itself, or a group: a group with one array is
that array; a group whose arrays are named ``0``, ``1``, ... (or listed in
an OME-NGFF ``multiscales`` attribute) is a pyramid, level 0 first. Anything
else is refused with the group's array names.
"""

from __future__ import annotations

from .base import ArrayImage, Fc2ConvError, check_level, require


def _levels(node, zarr, path) -> list:
    """The arrays of ``node``, level 0 first."""
    if isinstance(node, zarr.Array):
        return [node]
    arrays = dict(node.arrays())
    multiscales = node.attrs.get("multiscales") or node.attrs.get("ome", {}).get("multiscales")
    if multiscales:
        names = [d["path"] for d in multiscales[0]["datasets"]]
        if all(n in arrays for n in names):
            return [arrays[n] for n in names]
    if arrays and all(n.isdigit() for n in arrays):
        return [arrays[n] for n in sorted(arrays, key=int)]
    if len(arrays) == 1:
        return list(arrays.values())
    names = ", ".join(sorted(arrays)) or "none"
    raise Fc2ConvError(f"{path}: a zarr group with arrays {names}; open one of them (PATH/NAME) "
                       "or make the group a pyramid (arrays 0, 1, ...)")


class ZarrImage(ArrayImage):
    """One level of a zarr array or pyramid."""

    def __init__(self, path, level: int = 0, spatial_rank: int = 2):
        zarr = require("zarr", "scan")
        try:
            node = zarr.open(store=str(path), mode="r")
        except Exception as exc:
            raise Fc2ConvError(f"{path}: not a readable zarr array or group ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        arrays = _levels(node, zarr, path)
        shapes = tuple(tuple(int(n) for n in a.shape[:spatial_rank]) for a in arrays)
        check_level(path, level, shapes)
        super().__init__(arrays[level], spatial_rank, str(path))
        self.level, self.levels, self.level_shapes = level, len(arrays), shapes
        self.chunk = tuple(int(c) for c in arrays[level].chunks[:spatial_rank])
        self._reopen = (open, (str(path), level, spatial_rank))

    def open_level(self, level: int) -> "ZarrImage":
        check_level(self.path, level, self.level_shapes)
        return self if level == self.level else ZarrImage(self.path, level, self._spatial_rank)


def open(path, level: int = 0, spatial_rank: int = 2) -> ZarrImage:  # noqa: A001 - the format modules' entry point
    return ZarrImage(path, level, spatial_rank)
