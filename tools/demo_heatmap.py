"""The README's demo: held-out digits pasted on a black canvas at known
places, and the heatmap the trained sample draws on it.

    python tools/demo_heatmap.py          # writes docs/digits_canvas.png, then runs COMMAND

COMMAND (run from the repository root) writes docs/digits_heatmap.png::

    onnx-fc2conv heatmap models/digits.onnx docs/digits_canvas.png -o docs/digits_heatmap.png --scale 1/240 --top 1 --zoom 8 --legend

Choices, so the picture shows what the model really computes:

- The canvas stays at the digits' native scale (8x8 pixels a digit, as
  models/digits.onnx was trained): enlarging it would show the model digits
  of a size it never saw. ``--zoom 8`` enlarges only the drawing.
- Pixel values are the data set's 0..16 times 15 (0..240), so ``--scale
  1/240`` gives the model exactly the values it was trained on (v/16).
- Digits sit at even coordinates: the map's stride is 2, so each digit's
  8x8 box is exactly one window (``--dense-stride 1`` gives a window at every
  pixel; see tests/test_heatmap.py).
- The ten digits are the first held-out image of each class
  (models/digits_heldout.npz), whatever the model makes of them.

:func:`paste` and :func:`random_canvas` also make the localisation test's
canvases (tests/test_demo.py). numpy and Pillow only.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "models" / "digits_heldout.npz"
CANVAS = "docs/digits_canvas.png"
HEATMAP = "docs/digits_heatmap.png"
COMMAND = (f"onnx-fc2conv heatmap models/digits.onnx {CANVAS} -o {HEATMAP} --scale 1/240 --top 1 --zoom 8 --legend")
SIZE = (40, 96)
# top-left corners (row, column) of the digits 0..9, even coordinates
PLACES = [(4, 4), (6, 20), (2, 36), (4, 54), (8, 74),
          (26, 10), (22, 28), (28, 44), (24, 62), (26, 82)]
PIXEL = 15   # data set value 0..16 -> pixel 0..240


def heldout():
    """The held-out images (uint8 0..16, [450, 8, 8]) and labels."""
    with np.load(HELDOUT) as z:
        return z["images"], z["labels"]


def paste(size, places, images) -> np.ndarray:
    """A black canvas with ``images`` (0..16) pasted at ``places`` (top-left corners)."""
    canvas = np.zeros(size, np.uint8)
    for (y, x), img in zip(places, images):
        canvas[y:y + 8, x:x + 8] = img.astype(np.uint8) * PIXEL
    return canvas


def demo_canvas():
    """The README's canvas and the held-out index of each pasted digit (0..9)."""
    images, labels = heldout()
    picks = [int(np.flatnonzero(labels == d)[0]) for d in range(10)]
    return paste(SIZE, PLACES, images[picks]), picks


def random_canvas(indices, size=(60, 100), cell=10, seed=0, even=True):
    """Held-out digits ``indices`` on a grid of ``cell``-pixel cells, each moved
    by 0..cell-8 pixels (even amounts when ``even``); boxes never overlap.
    Returns the canvas and the top-left corner of each digit."""
    images, _ = heldout()
    rng = np.random.default_rng(seed)
    rows, cols = size[0] // cell, size[1] // cell
    if len(indices) > rows * cols:
        raise ValueError(f"{len(indices)} digits do not fit {rows}x{cols} cells")
    slack = cell - 8
    places = []
    for k in range(len(indices)):
        r, c = divmod(k, cols)
        dy, dx = rng.integers(0, slack + 1, size=2)
        if even:
            dy, dx = dy - dy % 2, dx - dx % 2
        places.append((r * cell + int(dy), c * cell + int(dx)))
    return paste(size, places, images[list(indices)]), places


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the demo canvas and run the heatmap command on it.")
    ap.add_argument("--no-run", action="store_true", help="only write the canvas")
    args = ap.parse_args(argv)
    from PIL import Image

    canvas, picks = demo_canvas()
    (ROOT / CANVAS).parent.mkdir(exist_ok=True)
    Image.fromarray(canvas).save(ROOT / CANVAS)
    print(f"wrote {CANVAS} ({canvas.shape[0]}x{canvas.shape[1]} pixels, held-out digits {picks} at {PLACES})")
    if args.no_run:
        return 0
    print(COMMAND)
    cmd = shlex.split(COMMAND)
    return subprocess.run([sys.executable, "-m", "onnx_fc2conv"] + cmd[1:], cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main())
