"""A large tiled RGB TIFF (BigTIFF) of any size, written tile by tile, for
scanning with a 3-channel model (``models/vgg_small.onnx``) at sizes that one
onnxruntime pass cannot take.

    python tools/make_scene_tiff.py --size 20000 -o bench-out/scene20000.tif
    python -m onnx_fc2conv scan models/vgg_small.onnx bench-out/scene20000.tif -o bench-out/scene.zarr

The picture: smooth colour waves plus seeded noise and a few hundred bright
discs, so that the map has structure and zlib still compresses it; every
pixel is a function of its coordinates and ``--seed``, so a rerun writes the
same file, and any region can be recomputed without reading the file
(:func:`region`), which is how a test or a run compares a scan's input with
what was written. Memory: one tile at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def discs(size: int, seed: int, count: int | None = None) -> np.ndarray:
    """``[y, x, radius, r, g, b]`` rows, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    n = count if count is not None else max(8, size * size // 2_000_000)
    return np.column_stack([rng.integers(0, size, n), rng.integers(0, size, n), rng.integers(8, 64, n),
                            rng.integers(64, 256, (n, 3))])


def region(y0: int, y1: int, x0: int, x1: int, seed: int, spots: np.ndarray) -> np.ndarray:
    """Pixels ``[y0:y1, x0:x1]`` of the scene, uint8 ``[h, w, 3]``."""
    y = np.arange(y0, y1, dtype=np.float32)[:, None]
    x = np.arange(x0, x1, dtype=np.float32)[None, :]
    img = np.empty((y1 - y0, x1 - x0, 3), np.float32)
    img[..., 0] = 96 + 60 * np.sin(x / 173.0) * np.cos(y / 251.0)
    img[..., 1] = 96 + 60 * np.sin((x + y) / 397.0)
    img[..., 2] = 96 + 60 * np.cos((x - 2 * y) / 311.0)
    # noise that depends on the coordinates only (a hash), not on the tile order
    h = (y.astype(np.uint64) * np.uint64(73856093)) ^ (x.astype(np.uint64) * np.uint64(19349663)) \
        ^ np.uint64(seed * 83492791 + 1)
    h = (h * np.uint64(2654435761)) % np.uint64(4294967291)
    img += ((h % np.uint64(33)).astype(np.float32) - 16.0)[..., None]
    near = spots[(spots[:, 0] + spots[:, 2] >= y0) & (spots[:, 0] - spots[:, 2] < y1)
                 & (spots[:, 1] + spots[:, 2] >= x0) & (spots[:, 1] - spots[:, 2] < x1)]
    for cy, cx, r, *rgb in near:
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
        img[inside] = rgb
    return np.clip(img, 0, 255).astype(np.uint8)


def write(path: Path, size: int, tile: int = 256, seed: int = 0) -> None:
    import tifffile

    spots = discs(size, seed)

    def tiles():
        for ty in range(0, size, tile):
            for tx in range(0, size, tile):
                t = np.zeros((tile, tile, 3), np.uint8)
                r = region(ty, min(size, ty + tile), tx, min(size, tx + tile), seed, spots)
                t[: r.shape[0], : r.shape[1]] = r
                yield t

    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                  compression="zlib")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", type=Path, default=Path("scene.tif"))
    args = ap.parse_args(argv)
    write(args.output, args.size, args.tile, args.seed)
    print(f"{args.output}: {args.size}x{args.size} RGB, tiles {args.tile}, "
          f"{args.output.stat().st_size / 2**20:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
