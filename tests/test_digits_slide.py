"""tools/make_digits_slide.py: the generated slide holds the digits its JSON
says, where it says; its levels are box means of level 0; it is written
without holding the image; the digits model's dense map names each digit at
the recorded place."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from onnx_fc2conv.heatmap import heatmap
from onnx_fc2conv.images import open_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_digits_slide as slide  # noqa: E402

SIZE = (600, 520)       # not a multiple of the tile: edge tiles and cut boxes in every level


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("slide") / "digits.tif"
    slide.main(["-o", str(out), "--size", *map(str, SIZE), "--tile", "128", "--cell", "20", "--seed", "3"])
    return out, json.loads(out.with_suffix(".json").read_text())


def test_pixels_are_the_recorded_digits_on_black(written):
    out, record = written
    with np.load(ROOT / "models" / "digits_heldout.npz") as z:
        images, labels = z["images"], z["labels"]
    level0 = tifffile.imread(out)
    assert level0.shape == SIZE and level0.dtype == np.uint8
    expected = np.zeros(SIZE, np.uint8)
    for y, x, label, index in record["digits"]:
        assert y % 2 == 0 and x % 2 == 0 and y + 8 <= SIZE[0] and x + 8 <= SIZE[1]
        assert label == labels[index]
        assert not expected[y:y + 8, x:x + 8].any()         # no two digits overlap
        expected[y:y + 8, x:x + 8] = images[index] * 15
    np.testing.assert_array_equal(level0, expected)
    assert len(record["digits"]) > 200 and len(set(r[2] for r in record["digits"])) == 10


def test_levels_are_box_means_of_level_0(written):
    out, record = written
    level0 = tifffile.imread(out).astype(np.float64)
    assert record["levels"] == [[600, 520], [300, 260], [150, 130], [75, 65]]
    with open_image(out) as image:
        assert [list(s) for s in image.level_shapes] == record["levels"]
    for k, (h, w) in enumerate(record["levels"]):
        f = 2 ** k
        padded = np.full((h * f, w * f), np.nan)
        padded[:SIZE[0], :SIZE[1]] = level0
        mean = np.nanmean(padded.reshape(h, f, w, f), axis=(1, 3))
        np.testing.assert_array_equal(tifffile.imread(out, level=k), np.rint(mean).astype(np.uint8), err_msg=str(k))


def test_tiled_and_readable_by_both_tiff_readers(written):
    out, record = written
    with tifffile.TiffFile(out) as tif:
        assert all(page.is_tiled and page.tilelength == 128 for page in tif.pages)
    level1 = tifffile.imread(out, level=1)
    with open_image(out, level=1, reader="openslide") as image:
        np.testing.assert_array_equal(image.read(((0, 300), (0, 260)))[..., 0], level1)


def test_deterministic_and_seeded(written, tmp_path):
    out, _ = written
    again = tmp_path / "digits.tif"
    slide.write(again, SIZE, tile=128, cell=20, seed=3)
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.tif"
    slide.write(other, SIZE, tile=128, cell=20, seed=4)
    assert other.read_bytes() != out.read_bytes()


def test_the_readme_command_line_names_the_output_without_o(written, tmp_path, capsys):
    """README: python tools/make_digits_slide.py slide.tif --size 4096 (here smaller)."""
    out, _ = written
    positional = tmp_path / "slide.tif"
    slide.main([str(positional), "--size", *map(str, SIZE), "--tile", "128", "--cell", "20", "--seed", "3"])
    assert positional.read_bytes() == out.read_bytes() and positional.with_suffix(".json").exists()
    with pytest.raises(SystemExit):
        slide.main([str(tmp_path / "a.tif"), "-o", str(tmp_path / "b.tif")])
    assert "two outputs" in capsys.readouterr().err


def test_written_tile_by_tile_without_holding_the_image(tmp_path):
    size = (6000, 6000)                                      # 36 MB of pixels
    tracemalloc.start()
    try:
        slide.write(tmp_path / "big.tif", size, fill=0.02)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2 ** 20, peak                          # one tile and the layout, not the image
    with open_image(tmp_path / "big.tif") as image:
        assert image.shape == size and image.levels == 6


def test_the_dense_map_names_each_digit_at_its_recorded_place(written, tmp_path):
    out, record = written
    png = tmp_path / "level0.png"
    PILImage.fromarray(tifffile.imread(out)).save(png)
    hm = heatmap(ROOT / "models" / "digits.onnx", png, scale=record["scale"])
    assert [a.stride for a in hm.axes] == [2, 2]
    digits = np.array(record["digits"])
    at = hm.scores[:, digits[:, 0] // 2, digits[:, 1] // 2]  # the window whose corner is the digit's
    accuracy = float((at.argmax(0) == digits[:, 2]).mean())
    print(f"dense map argmax = recorded label at {accuracy:.3f} of {len(digits)} digits")
    assert accuracy >= 0.9, accuracy
    inner = (digits[:, 0] // 2 + 2 < hm.scores.shape[1]) & (digits[:, 1] // 2 + 2 < hm.scores.shape[2])
    moved = hm.scores[:, digits[inner, 0] // 2 + 2, digits[inner, 1] // 2 + 2]   # 4 pixels off: not the digit
    assert float((moved.argmax(0) == digits[inner, 2]).mean()) < accuracy - 0.3
