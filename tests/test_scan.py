"""scan: the stitched map equals the one-pass map (tiling.py's rule), for
every tile size it accepts, on 1-D/2-D/3-D trunks, padded and unpadded,
SAME padding and ceil-mode pools, --dense-stride; what it refuses; --check."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings, strategies as st

from onnx_fc2conv import Fc2ConvError, scan
from onnx_fc2conv.scanning import model as model_mod, store, tiling

from scan_models import assert_exact, classifier, dense_model, one_pass

EXAMPLES = max(8, settings().max_examples // 5)


def _read(out, name):
    return zarr.open_group(str(out), mode="r")[name][...]


# ------------------------------------------------------------ tiling maths ---

@settings(max_examples=400, deadline=None)
@given(s=st.integers(1, 8), rf_extra=st.integers(0, 40), off=st.integers(-20, 0), n_extra=st.integers(0, 300),
       tile_extra=st.integers(0, 80))
def test_tiles_cover_the_map_once_each_reading_within_tile(s, rf_extra, off, n_extra, tile_extra):
    rf = s + rf_extra
    n = rf + n_extra
    m = (n - rf - 2 * off) // s + 1          # positions of a map padded by -off at both ends
    tile = tiling.min_tile(s, rf) + tile_extra
    t = tiling.plan([n], [s], [rf], [off], [m], tile)
    ax = t.axes[0]
    owned = [p for c in range(ax.tiles) for p in range(*ax.owned(c))]
    assert owned == list(range(m))
    for c in range(ax.tiles):
        a, b = ax.read(c)
        assert 0 <= a < b <= n and a % s == 0 and (b == n or (n - b) % s == 0)
        assert b - a <= tile
        assert all(ax.valid(p, a, b) for p in range(*ax.owned(c)))


def test_a_tile_below_one_window_is_refused_naming_the_smallest():
    with pytest.raises(Fc2ConvError, match=r"--tile 73 is too small.*window \(60 px\).*give --tile 74"):
        tiling.plan([500, 500], [8, 8], [60, 60], [-14, -14], [62, 62], 73)
    assert tiling.plan([500, 500], [8, 8], [60, 60], [-14, -14], [62, 62], 74).chunks == (1, 1)


@settings(max_examples=300, deadline=None)
@given(s=st.integers(1, 8), rf_extra=st.integers(0, 40), off=st.integers(-20, 0), n_extra=st.integers(0, 400),
       tile_extra=st.integers(0, 200), k=st.integers(1, 40))
def test_blocks_split_each_tile_exactly_inside_its_region(s, rf_extra, off, n_extra, tile_extra, k):
    rf = s + rf_extra
    n = rf + n_extra
    m = (n - rf - 2 * off) // s + 1
    t = tiling.plan([n], [s], [rf], [off], [m], tiling.min_tile(s, rf) + tile_extra)
    ax = t.axes[0]
    for c in range(ax.tiles):
        ta, tb = ax.read(c)
        blocks = t.blocks((c,), (k,))
        assert [p for (owned,), _ in blocks for p in range(*owned)] == list(range(*ax.owned(c)))
        for ((p0, p1),), ((a, b),) in blocks:
            assert ta <= a < b <= tb and a % s == 0 and (b == n or (n - b) % s == 0)
            assert all(ax.valid(p, a, b) for p in range(p0, p1))


@pytest.mark.parametrize("sizes, s, rf, off, tile, blocks_per_axis", [
    ((12288, 12288), 8, 60, -14, 2048, 3),     # vgg_small: halo 66, smallest block 559 px = 70 positions, 247 in 3
    ((12288, 12288), 8, 60, -14, 1024, 1),     # ... 119 positions hold only one such block
    ((12288, 12288), 32, 212, -90, 2048, 1),   # a VGG16-like halo: two blocks would recompute too much
    ((300000,), 4, 40, 0, 2048, 1),            # 1-D: a tile is below the block's minimum pixels
])
def test_the_block_rule(sizes, s, rf, off, tile, blocks_per_axis):
    k = len(sizes)
    m = (sizes[0] - rf - 2 * off) // s + 1
    t = tiling.plan(sizes, [s] * k, [rf] * k, [off] * k, [m] * k, tile)
    ks = tiling.block_positions(t.axes)
    assert len(t.blocks((1,) * k, ks)) == blocks_per_axis ** k
    read = (ks[0] - 1) * s + rf + 2 * (s - 1)
    if blocks_per_axis > 1:     # the recomputation bound and the minimum size hold, and the split is even
        assert (read / (ks[0] * s)) ** k <= tiling.BLOCK_OVERHEAD
        assert read ** k >= tiling.MIN_BLOCK_PIXELS
        runs = [p1 - p0 for ((p0, p1), *_), _ in t.blocks((1,) * k, ks)]
        assert max(runs) - min(runs) < blocks_per_axis        # k = ceil(positions / blocks)


# -------------------------------------------------------------- exactness ---

def _pixels(shape, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 255).astype(dtype)


@pytest.mark.parametrize("model, shape, tiles", [
    ("models/vgg_small.onnx", (70, 90, 3), [74, 75, 81, 131]),    # padded 2-D trunk
    ("models/digits.onnx", (31, 27), [12, 13, 29]),                 # unpadded 2-D
    ("models/conv1d_net.onnx", (301, 4), [70, 77, 150]),            # 1-D
    ("models/conv3d_net.onnx", (23, 30, 19, 2), [20, 23]),          # 3-D, padded
])
def test_stitched_map_equals_one_pass(tmp_path, model, shape, tiles):
    pixels = _pixels(shape)
    ref = one_pass(model, pixels)
    for tile in tiles:
        out = tmp_path / f"t{tile}.zarr"
        result = scan(model, pixels, out, tile=tile)
        assert result.tiles > 1 or tile == max(tiles)
        for name, r in ref.items():
            assert_exact(_read(out, name), r, f"{model} tile {tile}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few positions, so that the test images' tiles run in many blocks."""
    monkeypatch.setattr(tiling, "MIN_BLOCK_PIXELS", 0)
    monkeypatch.setattr(tiling, "BLOCK_OVERHEAD", 40.0)


@pytest.mark.parametrize("model, shape, tile", [
    ("models/vgg_small.onnx", (150, 170, 3), 131),
    ("models/digits.onnx", (61, 47), 29),
    ("models/conv1d_net.onnx", (401, 4), 150),
    ("models/conv3d_net.onnx", (33, 30, 29, 2), 34),
])
def test_tiles_run_in_blocks_give_the_one_pass_map(tmp_path, small_blocks, model, shape, tile):
    pixels = _pixels(shape, 3)
    ref = one_pass(model, pixels)
    out = tmp_path / "o.zarr"
    result = scan(model, pixels, out, tile=tile)
    blocks = store.read_attrs(out)["blocks"]["positions"]
    assert result.tiles > 1 and any(b < c for b, c in zip(blocks, store.read_attrs(out)["tile"]["positions"]))
    for name, r in ref.items():
        assert_exact(_read(out, name), r, f"{model} in blocks of {blocks}")


def test_resume_runs_the_blocks_the_scan_began_with(tmp_path, monkeypatch):
    from onnx_fc2conv.scanning import engine

    pixels = _pixels((150, 170, 3), 4)
    out = tmp_path / "o.zarr"
    monkeypatch.setattr(tiling, "MIN_BLOCK_PIXELS", 0)
    monkeypatch.setattr(tiling, "BLOCK_OVERHEAD", 40.0)
    scan("models/vgg_small.onnx", pixels, out, tile=131)
    first = store.read_attrs(out)["blocks"]["positions"]
    full = _read(out, "prob")
    group = zarr.open_group(str(out), mode="r+")           # as if the scan had stopped halfway
    flags = group[store.DONE][...]
    flags.reshape(-1)[flags.size // 2:] = 0
    group[store.DONE][...] = flags
    monkeypatch.setattr(tiling, "BLOCK_OVERHEAD", tiling.BLOCK_OVERHEAD * 0 + 2.0)
    seen = []
    real = engine.run_here
    monkeypatch.setattr(engine, "run_here", lambda job, *a, **k: (seen.append(job.block), real(job, *a, **k))[1])
    result = scan("models/vgg_small.onnx", pixels, out, tile=131, resume=True)
    assert result.resumed > 0 and result.computed > 0
    assert seen == [tuple(first)] and tuple(first) != tiling.block_positions(tiling.plan(
        [150, 170], [8, 8], [60, 60], [-14, -14], list(full.shape[1:]), 131).axes)
    assert np.array_equal(_read(out, "prob"), full)


def test_dense_stride_map_equals_one_pass(tmp_path):
    pixels = _pixels((90, 77, 3), 1)
    ref = one_pass("models/vgg_small.onnx", pixels, dense_stride=4)
    scan("models/vgg_small.onnx", pixels, tmp_path / "f.zarr", tile=80, dense_stride=4)
    assert_exact(_read(tmp_path / "f.zarr", "prob"), ref["prob"], "dense stride 4")
    assert store.read_attrs(tmp_path / "f.zarr")["geometry"]["axes"][0]["stride"] == 4


@settings(max_examples=EXAMPLES, deadline=None)
@given(h=st.integers(15, 70), w=st.integers(15, 70), tile=st.integers(20, 60), seed=st.integers(0, 3))
def test_same_padding_and_ceil_pools_stitch_exactly(tmp_path_factory, h, w, tile, seed):
    """Every tile size is exact or refused (below one window plus the stride alignment: 25 px here)."""
    model = _DENSE[2]
    pixels = np.random.default_rng(seed).standard_normal((h, w, 2)).astype(np.float32)
    out = tmp_path_factory.mktemp("same") / "o.zarr"
    if tile < 25:
        with pytest.raises(Fc2ConvError, match="give --tile 25 or more"):
            scan(model, pixels, out, tile=tile, scale=1.0)
        return
    scan(model, pixels, out, tile=tile, scale=1.0)
    assert_exact(_read(out, "y"), one_pass(model, pixels, scale=1.0)["y"], f"{h}x{w} tile {tile}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(n=st.integers(19, 200), tile=st.integers(25, 50))
def test_same_padding_and_ceil_pools_stitch_exactly_1d(tmp_path_factory, n, tile):
    model = _DENSE[1]
    pixels = np.random.default_rng(n).standard_normal((n, 2)).astype(np.float32)
    out = tmp_path_factory.mktemp("same1") / "o.zarr"
    scan(model, pixels, out, tile=tile, scale=1.0)
    assert_exact(_read(out, "y"), one_pass(model, pixels, scale=1.0)["y"], f"{n} tile {tile}")


_DENSE = {1: dense_model(1), 2: dense_model(2)}


def test_channels_last_input_is_fed_channels_last(tmp_path):
    model = dense_model(2, nhwc=True)
    assert model_mod.prepare(model).channels_last
    pixels = np.random.default_rng(5).standard_normal((45, 38, 2)).astype(np.float32)
    scan(model, pixels, tmp_path / "o.zarr", tile=30, scale=1.0)
    ref = one_pass(model, pixels, scale=1.0)["y"]
    assert_exact(_read(tmp_path / "o.zarr", "y"), ref, "NHWC")
    nchw = one_pass(_DENSE[2], pixels, scale=1.0)["y"]      # the same weights read channels first
    assert_exact(ref, nchw, "NHWC model vs its NCHW twin")


def test_the_alignment_rule_is_needed_for_same_padding():
    """The test model is sensitive: a crop whose end is not N - k*s (the rule)
    pads its SAME layer differently and gets valid-looking positions wrong."""
    model = _DENSE[1]
    dense = model_mod.prepare(model)
    x = np.random.default_rng(0).standard_normal((101, 2)).astype(np.float32)
    full = one_pass(model, x, scale=1.0)["y"]
    at = model_mod.at_size(dense, (101,))
    a = at.axes[0]
    for end, aligned in ((101 - 4 * 5, True), (101 - 4 * 5 - 1, False)):
        crop = one_pass(model, x[:end], scale=1.0)["y"]
        ps = [p for p in range(min(crop.shape[1], full.shape[1])) if a.offset + p * a.stride + a.receptive_field <= end]
        same = np.allclose(crop[:, ps], full[:, ps], rtol=0, atol=1e-5 * np.abs(full).max())
        assert same == aligned, (end, aligned)


def test_classifier_with_ceil_pool_is_made_dense_and_stitched(tmp_path):
    model = classifier()
    pixels = _pixels((53, 60), 2)
    ref = one_pass(model, pixels)["prob"]
    for tile in (18, 19, 25):
        scan(model, pixels, tmp_path / f"c{tile}.zarr", tile=tile)
        assert_exact(_read(tmp_path / f"c{tile}.zarr", "prob"), ref, f"tile {tile}")


# ---------------------------------------------------------------- refusals ---

def test_kept_global_pool_is_refused_by_name(tmp_path):
    with pytest.raises(Fc2ConvError, match=r"GlobalAveragePool 'se_pool'.*no tiling can be exact"):
        scan(classifier(se=True), _pixels((40, 40)), tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_image_smaller_than_the_window_is_refused(tmp_path):
    with pytest.raises(Fc2ConvError, match="smaller than the model's window"):
        scan("models/lenet.onnx", _pixels((20, 40)), tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_wrong_channel_count_is_refused(tmp_path):
    with pytest.raises(Fc2ConvError, match="RGB image, but the model's input has 1 channel"):
        scan("models/digits.onnx", _pixels((40, 40, 3)), tmp_path / "o.zarr")


def test_rgba_drops_alpha(tmp_path):
    rgba = _pixels((70, 70, 4), 3)
    scan("models/vgg_small.onnx", rgba, tmp_path / "o.zarr", tile=100)
    assert_exact(_read(tmp_path / "o.zarr", "prob"), one_pass("models/vgg_small.onnx", rgba[..., :3])["prob"])


# ------------------------------------------------------------------ output ---

def test_output_group_records_what_the_map_is(tmp_path):
    np.save(tmp_path / "img.npy", _pixels((64, 80)))
    out = tmp_path / "o.zarr"
    result = scan("models/digits.onnx", tmp_path / "img.npy", out, tile=30, scale="1/16")
    group = zarr.open_group(str(out), mode="r")
    attrs = dict(group.attrs)[store.ATTR]
    arr = group["logits"]
    # K = (tile - rf - 2*(s-1)) // s + 1 = (30 - 8 - 2) // 2 + 1 positions per tile
    assert arr.dtype == np.float32 and arr.shape == (10, 29, 37) and arr.chunks == (10, 11, 11)
    assert group.metadata.zarr_format == 3
    import hashlib
    assert attrs["model_sha256"] == hashlib.sha256(open("models/digits.onnx", "rb").read()).hexdigest()
    assert attrs["image"] == {"path": str(tmp_path / "img.npy"), "size": [64, 80], "level": 0, "channels": 1,
                              "dtype": "uint8"}
    assert attrs["preprocessing"]["scale"] == 1 / 16
    assert attrs["tile"]["size"] == [30, 30] and attrs["tile"]["grid"] == [3, 4]
    assert [(a["stride"], a["receptive_field"], a["offset"]) for a in attrs["geometry"]["axes"]] == [(2, 8, 0)] * 2
    assert result.tiles == 12 and result.computed == 12 and store.done_flags(group).all()


# ------------------------------------------------------------------- check ---

def test_check_passes_on_a_scan_and_fails_on_a_map_stitched_without_halos(tmp_path):
    model = "models/vgg_small.onnx"
    pixels = _pixels((170, 160, 3), 4)
    out = tmp_path / "o.zarr"
    result = scan(model, pixels, out, tile=150, check=True, samples=3)
    assert result.check.ok, result.check.lines
    assert any("original classifier" in line and line.startswith("PASSED") for line in result.check.lines)
    # the same tiles, each run on its own pixels only (no halo), stitched
    attrs = store.read_attrs(out)
    from onnx_fc2conv.scanning.check import check, plan_from

    t = plan_from(attrs)
    good = _read(out, "prob")
    bad = good.copy()
    for tile in t.tiles():
        box = [(p0 * a.stride, min(a.size, p1 * a.stride)) for a, (p0, p1) in zip(t.axes, t.owned(tile))]
        crop = pixels[box[0][0]:box[0][1], box[1][0]:box[1][1]]
        if min(crop.shape[:2]) < 32:
            continue
        y = one_pass(model, crop)["prob"]
        p = [p0 for (p0, _) in t.owned(tile)]
        n = [min(k, m) for k, m in zip(t.chunks, y.shape[1:])]
        bad[:, p[0]:p[0] + n[0], p[1]:p[1] + n[1]] = y[:, :n[0], :n[1]]
    assert np.abs(bad - good).max() > 1e-3        # the halo-less map is wrong somewhere
    zarr.open_group(str(out), mode="r+")["prob"][...] = bad
    report = check(out, model_mod.prepare(model), pixels, samples=3)
    assert not report.ok
    assert any(line.startswith("FAILED") and "tiles) vs one pass" in line for line in report.lines)


def test_check_samples_block_seams_and_fails_on_blocks_run_without_halos(tmp_path, small_blocks, monkeypatch):
    model = "models/vgg_small.onnx"
    pixels = _pixels((170, 160, 3), 6)
    out = tmp_path / "o.zarr"
    result = scan(model, pixels, out, tile=256, check=True, samples=4)      # one tile, many blocks
    assert result.tiles == 1 and result.check.ok, result.check.lines
    # with several tiles, every other region sits on a corner where blocks meet inside one tile
    monkeypatch.setattr(tiling, "BLOCK_OVERHEAD", 7.8)      # 2 x 2 blocks of 5 positions in a tile of 10
    several = scan(model, pixels, tmp_path / "t.zarr", tile=150, check=True, samples=4)
    assert several.tiles == 4 and several.check.ok
    assert sum("(1 tile, 4 blocks) vs one pass" in line for line in several.check.lines) == 2
    assert sum("(4 tiles) vs one pass" in line for line in several.check.lines) == 2
    from onnx_fc2conv.scanning.check import check, plan_from

    attrs = store.read_attrs(out)
    t = plan_from(attrs)
    good = _read(out, "prob")
    bad = good.copy()
    for (o0, o1), _ in t.blocks((0, 0), attrs["blocks"]["positions"]):   # each block on its own pixels only
        crop = pixels[o0[0] * 8:min(170, o0[1] * 8 + 32), o1[0] * 8:min(160, o1[1] * 8 + 32)]
        y = one_pass(model, crop)["prob"]
        n = [min(b - a, m) for (a, b), m in zip((o0, o1), y.shape[1:])]
        bad[:, o0[0]:o0[0] + n[0], o1[0]:o1[0] + n[1]] = y[:, :n[0], :n[1]]
    assert np.abs(bad - good).max() > 1e-3
    zarr.open_group(str(out), mode="r+")["prob"][...] = bad
    report = check(out, model_mod.prepare(model), pixels, samples=4)
    assert not report.ok
    assert any(line.startswith("FAILED") and "blocks) vs one pass" in line for line in report.lines)


def test_check_window_property_fails_on_a_wrong_map(tmp_path):
    model = "models/digits.onnx"
    pixels = _pixels((50, 50), 5)
    out = tmp_path / "o.zarr"
    scan(model, pixels, out, tile=200)               # one tile: the region check cannot see a wrong value...
    arr = zarr.open_group(str(out), mode="r+")["logits"]
    arr[...] = arr[...] * 1.001                       # ...that the one-pass recomputation and the windows can
    from onnx_fc2conv.scanning.check import check

    report = check(out, model_mod.prepare(model), pixels, samples=2)
    assert not report.ok
    assert [line[:6] for line in report.lines if "original classifier" in line] == ["FAILED"]


# ---------------------------------------------------------------- overview ---

def test_overview(tmp_path):
    """Runs only where onnx_fc2conv.draw exists (the renderer is merged from another branch)."""
    pytest.importorskip("onnx_fc2conv.draw")
    from PIL import Image

    pixels = _pixels((300, 200), 6)
    result = scan("models/digits.onnx", pixels, tmp_path / "o.zarr", tile=64, overview=tmp_path / "o.png",
                  cls=3, scale="1/16")
    assert result.overview == str(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as img:
        assert img.size[0] >= 200 and img.size[1] >= 300


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pixel_type", [np.uint8, np.uint16, np.float64])
@pytest.mark.parametrize("mean,std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                                      ((0.5, 0.0, 0.25), (1.0, 0.5, 1.0))])
def test_preprocessing_gives_the_bits_of_the_float32_formula(channels_last, pixel_type, mean, std):
    """x = (pixels * scale - mean) / std, each operation rounded to float32 in
    that order, for every pixel type, with the steps that change nothing skipped."""
    import dataclasses

    dense = dataclasses.replace(model_mod.prepare("models/vgg_small.onnx"), channels_last=channels_last)
    prep = model_mod.Preprocessing(1 / 255, mean, std)
    px = _pixels((37, 41, 4), 7).astype(pixel_type)      # RGBA: alpha is dropped
    if pixel_type == np.float64:
        px = px * 1.37 - 20.5
    got = model_mod.to_input(px, dense, prep)
    f32 = np.float32
    expected = ((px[..., :3].astype(f32) * f32(1 / 255)) - np.array(mean, f32)) / np.array(std, f32)
    expected = expected if channels_last else np.moveaxis(expected, -1, 0)
    assert got.dtype == np.float32 and got.shape == (1,) + expected.shape and got.flags.c_contiguous
    assert np.array_equal(got[0], expected)
    assert np.allclose(got[0], (px[..., :3] / 255 - np.array(mean)) / np.array(std)
                       if channels_last else np.moveaxis((px[..., :3] / 255 - np.array(mean)) / np.array(std), -1, 0),
                       atol=1e-5)


def test_every_score_map_output_gets_its_array(tmp_path):
    from onnx import TensorProto, helper

    model = classifier()
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5]))
    pixels = _pixels((60, 50), 8)
    scan(model, pixels, tmp_path / "o.zarr", tile=20)
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert sorted(group.array_keys()) == ["logits", "prob", store.DONE]
    for name, ref in one_pass(model, pixels).items():
        assert_exact(group[name][...], ref, name)


@pytest.mark.parametrize("provider, threads, cores, want", [
    ("cpu", None, 2, (2, 1)),       # two one-thread lanes on 2 cores
    ("cpu", None, 16, (2, 8)),      # lanes x threads = cores
    ("cpu", None, 1, (1, 1)),
    ("cpu", 2, 2, (1, 2)),          # --threads 2 on 2 cores: one lane, the next tile read ahead
    ("cpu", 4, 16, (2, 4)),         # never more than two tiles' activations at once
    ("cuda", None, 16, (1, None)),  # the GPU: one lane
])
def test_lanes_split_the_cores(provider, threads, cores, want):
    from onnx_fc2conv.scanning import engine

    assert engine.lanes_for(provider, threads, cores) == want


def test_two_lanes_and_one_lane_give_the_one_pass_map(tmp_path):
    """The same tiles in one lane (read ahead) and two lanes (two tiles at once on one session)."""
    from onnx_fc2conv.scanning import engine

    pixels = (np.random.default_rng(5).random((170, 150, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "img.npy", pixels)
    ref = one_pass("models/vgg_small.onnx", pixels)["prob"]
    for lanes in (1, 2):
        calls = []
        real = engine.run_here

        def spy(job, data, todo, on_tile, n, real=real):
            calls.append(n)
            return real(job, data, todo, on_tile, lanes)

        engine.run_here = spy
        try:
            result = scan("models/vgg_small.onnx", tmp_path / "img.npy", tmp_path / f"o{lanes}.zarr", tile=80)
        finally:
            engine.run_here = real
        assert calls and result.computed == result.tiles > 6
        got = zarr.open_group(str(tmp_path / f"o{lanes}.zarr"), mode="r")["prob"][...]
        assert_exact(got, ref, f"{lanes} lane(s)")
