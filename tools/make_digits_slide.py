"""A large tiled, pyramidal TIFF of held-out digits, for the README's `scan` example.

    python tools/make_digits_slide.py                        # digits_slide.tif (4096x4096) + digits_slide.json
    python tools/make_digits_slide.py --size 20000 -o /tmp/big.tif   # 400 M pixels, written tile by tile

The picture: a black background (the digits model was trained on white
digits on black) divided into ``--cell`` x ``--cell`` cells; each cell holds,
with probability ``--fill``, one held-out digit (models/digits_heldout.npz,
8x8, values 0..16 times 15 as in tools/demo_heatmap.py, so ``--scale 1/240``
gives the model its training values) at a random even offset inside the
cell. Even coordinates put each digit exactly on one window of the digits
model's dense map (stride 2, receptive field 8, offset 0): the digit whose
top-left corner is ``(y, x)`` is map position ``(y/2, x/2)``. Everything is
drawn from ``np.random.default_rng(--seed)``, so a rerun writes the same
pixels.

The JSON beside the TIFF (same name, ``.json``) records the size, tile,
level sizes, the pixel scale and every digit as ``[y, x, label,
heldout_index]``, so a test or the README can check that the map peaks on
the right class where each digit is.

File: uint8 grayscale, tiles ``--tile`` (256) compressed with zlib; level 0
first, then reduced levels (TIFF NewSubfileType 1, as top-level pages, which
both tifffile's ``series[0].levels`` and OpenSlide's generic-tiff read as a
pyramid), each half the previous, down to the first level that fits in one
tile. A level-k pixel is the mean of the 2^k x 2^k level-0 pixels it covers
(cut at the border), computed from the digits directly (at most ``BATCH``
cells at once), so no level is ever held whole: tifffile writes each level
from a generator of tiles, and the memory is one tile plus the digit layout
(about 200 bytes a digit with the JSON list; 20000x20000 with 195 624 digits:
peak RSS 98 MiB for a 400 MB image). BigTIFF when the file could pass 4 GB.
numpy and tifffile only.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "models" / "digits_heldout.npz"
PIXEL = 15   # data set value 0..16 -> pixel 0..240 (tools/demo_heatmap.py)
DIGIT = 8
BATCH = 4096  # cells drawn at once by Layout.render


class Layout:
    """Where every digit is: one optional digit per cell, at an even offset inside it."""

    def __init__(self, size, cell: int, fill: float, seed: int):
        if cell < DIGIT:
            raise ValueError(f"--cell must be at least {DIGIT}")
        with np.load(HELDOUT) as z:
            self.images, labels = z["images"].astype(np.int64) * PIXEL, z["labels"]
        self.size, self.cell = tuple(size), cell
        rows, cols = (-(-n // cell) for n in size)
        rng = np.random.default_rng(seed)
        present = rng.random((rows, cols)) < fill
        # even offsets 0..cell-8, and the digit must lie inside the image
        dy = 2 * rng.integers(0, (cell - DIGIT) // 2 + 1, (rows, cols))
        dx = 2 * rng.integers(0, (cell - DIGIT) // 2 + 1, (rows, cols))
        self.y = np.arange(rows)[:, None] * cell + dy
        self.x = np.arange(cols)[None, :] * cell + dx
        self.present = present & (self.y + DIGIT <= size[0]) & (self.x + DIGIT <= size[1])
        self.pick = rng.integers(0, len(self.images), (rows, cols))
        self.labels = labels

    def digits(self) -> list:
        """``[y, x, label, heldout_index]`` of every digit, row by row."""
        r, c = np.nonzero(self.present)
        pick = self.pick[r, c]
        return np.stack([self.y[r, c], self.x[r, c], self.labels[pick], pick], 1).tolist()

    def render(self, y0: int, y1: int, x0: int, x1: int, k: int = 0) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of level ``k`` (uint8): box means of level 0."""
        s = 1 << k
        Y0, Y1, X0, X1 = y0 * s, min(y1 * s, self.size[0]), x0 * s, min(x1 * s, self.size[1])
        out_h, out_w = y1 - y0, x1 - x0
        r0, r1 = max(0, (Y0 - DIGIT) // self.cell), -(-Y1 // self.cell)
        c0, c1 = max(0, (X0 - DIGIT) // self.cell), -(-X1 // self.cell)
        sums = np.zeros(out_h * out_w, np.int64)
        band = max(1, BATCH // max(1, c1 - c0))     # cell rows per batch: memory bounded at any level
        for b0 in range(r0, r1, band):
            b1 = min(r1, b0 + band)
            sel = self.present[b0:b1, c0:c1]
            if not sel.any():
                continue
            ys, xs = self.y[b0:b1, c0:c1][sel], self.x[b0:b1, c0:c1][sel]
            values = self.images[self.pick[b0:b1, c0:c1][sel]]               # [n, 8, 8]
            rr = ys[:, None, None] + np.arange(DIGIT)[None, :, None]          # level-0 rows
            cc = xs[:, None, None] + np.arange(DIGIT)[None, None, :]
            rr, cc = np.broadcast_to(rr, values.shape), np.broadcast_to(cc, values.shape)
            inside = (rr >= Y0) & (rr < Y1) & (cc >= X0) & (cc < X1)
            flat = ((rr[inside] >> k) - y0) * out_w + ((cc[inside] >> k) - x0)
            np.add.at(sums, flat, values[inside])
        rows = np.clip(np.minimum((np.arange(y0, y1) + 1) * s, self.size[0]) - np.arange(y0, y1) * s, 0, None)
        cols = np.clip(np.minimum((np.arange(x0, x1) + 1) * s, self.size[1]) - np.arange(x0, x1) * s, 0, None)
        count = np.maximum(rows[:, None] * cols[None, :], 1)
        return np.rint(sums.reshape(out_h, out_w) / count).astype(np.uint8)


def level_sizes(size, tile: int) -> list:
    """Level 0, then halves (rounded up), down to the first that fits one tile."""
    sizes = [tuple(size)]
    while max(sizes[-1]) > tile:
        sizes.append(tuple(-(-n // 2) for n in sizes[-1]))
    return sizes


def tiles(layout: Layout, level_size, k: int, tile: int):
    """Tiles of level ``k`` in row-major order, each ``tile x tile`` (tifffile pads the edges)."""
    h, w = level_size
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            yield layout.render(y0, min(y0 + tile, h), x0, min(x0 + tile, w), k)


def write(out: Path, size, tile: int = 256, cell: int = 32, fill: float = 0.5, seed: int = 0) -> dict:
    """Write the TIFF and its JSON; returns what the JSON holds."""
    import tifffile

    layout = Layout(size, cell, fill, seed)
    sizes = level_sizes(size, tile)
    bigtiff = size[0] * size[1] * 4 // 3 > 2 ** 32 - 2 ** 25
    with tifffile.TiffWriter(out, bigtiff=bigtiff) as tif:
        for k, level_size in enumerate(sizes):
            tif.write(tiles(layout, level_size, k, tile), shape=level_size, dtype=np.uint8, tile=(tile, tile),
                      compression="zlib", photometric="minisblack", subfiletype=1 if k else 0)
    record = {
        "image": out.name, "size": list(size), "tile": tile, "levels": [list(s) for s in sizes],
        "cell": cell, "fill": fill, "seed": seed, "pixel_per_value": PIXEL, "scale": "1/240",
        "background": 0, "digit_size": DIGIT, "columns": ["y", "x", "label", "heldout_index"],
        "digits": layout.digits(),
    }
    out.with_suffix(".json").write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiled pyramidal TIFF of held-out digits and a JSON of where "
                                             "each digit is.")
    ap.add_argument("path", nargs="?", help="the TIFF to write (as -o)")
    ap.add_argument("-o", "--out", default=None, help="the TIFF to write (the JSON goes beside it; "
                                                      "default digits_slide.tif)")
    ap.add_argument("--size", type=int, nargs="+", default=[4096], metavar="N",
                    help="N (square) or H W in pixels (default 4096)")
    ap.add_argument("--tile", type=int, default=256, help="TIFF tile side, a multiple of 16 (default 256)")
    ap.add_argument("--cell", type=int, default=32, help="one digit at most per CELLxCELL cell (default 32)")
    ap.add_argument("--fill", type=float, default=0.5, help="share of cells holding a digit (default 0.5)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.path and args.out and args.path != args.out:
        ap.error(f"two outputs given: {args.path} and -o {args.out}")
    args.out = args.path or args.out or "digits_slide.tif"
    if len(args.size) not in (1, 2) or min(args.size) < DIGIT:
        ap.error("--size takes N or H W, each at least 8")
    if args.tile % 16:
        ap.error("--tile must be a multiple of 16 (TIFF)")
    size = (args.size[0], args.size[-1])
    out = Path(args.out)
    start = time.perf_counter()
    record = write(out, size, args.tile, args.cell, args.fill, args.seed)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {out} ({size[0]}x{size[1]}, {len(record['levels'])} levels, {len(record['digits'])} digits, "
          f"{out.stat().st_size / 2 ** 20:.1f} MiB) and {out.with_suffix('.json')} in {seconds:.1f} s, "
          f"peak RSS {peak:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
