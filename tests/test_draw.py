"""draw.picture on its own: the picture is the image's size, each map cell
is painted where the geometry puts it, in the colours and opacities the
module docstring gives, at any zoom. Expected pixels come from the colour
tables written out here and from a reference that paints every input pixel
(or half pixel) with its cell and averages blocks: no code of draw.py."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from onnx_fc2conv import Fc2ConvError
from onnx_fc2conv.draw import picture, png_bytes, scaled
from onnx_fc2conv.geometry import MapAxis

# viridis anchors at 0, 1/4, 1/2, 3/4, 1 and the first class colours, as the module documents them
ANCHORS = {0.0: (68, 1, 84), 0.25: (59, 82, 139), 0.5: (33, 145, 140), 0.75: (94, 201, 98), 1.0: (253, 231, 37)}
CLASS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def axis(stride, rf, offset=0):
    return MapAxis("x", 2, stride, rf, offset)


def rgb(img):
    return np.asarray(img.convert("RGB")).astype(np.float64)


def test_picture_is_the_image_size_and_the_legend_a_strip_below():
    image = np.full((40, 96), 100, np.uint8)
    probs = np.full((3, 17, 45), 1 / 3)
    axes = [axis(2, 8), axis(2, 8)]
    assert picture(image, probs, axes).size == (96, 40)
    with_legend = picture(image, probs, axes, legend=True)
    assert with_legend.size[0] == 96 and with_legend.size[1] > 40 + 13
    np.testing.assert_array_equal(rgb(with_legend)[:40], rgb(picture(image, probs, axes)))
    assert (rgb(with_legend)[45:] == (24, 24, 24)).all(axis=2).mean() > 0.5      # the strip's background
    captioned = picture(image, probs, axes, caption="output 'prob'")
    assert captioned.size[0] == 96 and 40 < captioned.size[1] < with_legend.size[1]
    # at zoom 1/4 the image handed in is already the picture's size
    small = scaled(np.zeros((400, 960), np.uint8), 0.25)
    assert small.shape == (100, 240)
    assert picture(small, np.full((3, 197, 477), 1 / 3), axes, zoom=0.25).size == (240, 100)


def test_png_bytes_round_trip():
    img = picture(np.zeros((8, 8), np.uint8), np.full((2, 1, 1), 0.5), [axis(8, 8), axis(8, 8)])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(img)))), np.asarray(img))


@pytest.mark.parametrize("zoom", [1, 3])
def test_class_probability_colours_at_known_cells(zoom):
    """stride 4, window 8, offset 0: cell (i, j) starts at 2 + 4i, 2 + 4j; 0.6 opacity."""
    p = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.5]])
    probs = np.stack([p, 1 - p])
    base = np.full((14 * zoom, 18 * zoom, 3), 50, np.uint8)
    out = rgb(picture(base, probs, [axis(4, 8), axis(4, 8)], zoom=zoom, cls=0))
    for i in range(2):
        for j in range(3):
            want = 50 * 0.4 + np.array(ANCHORS[p[i, j]]) * 0.6
            block = out[(2 + 4 * i) * zoom:(6 + 4 * i) * zoom, (2 + 4 * j) * zoom:(6 + 4 * j) * zoom]
            assert np.abs(block - want).max() <= 0.5, (i, j)
    # the margin no window is centred on keeps the image
    assert (out[:2 * zoom] == 50).all() and (out[:, :2 * zoom] == 50).all()
    assert (out[10 * zoom:] == 50).all() and (out[:, 14 * zoom:] == 50).all()


def test_top_classes_in_bands():
    """--top 2: each 4-pixel cell is two 2-pixel bands, best class on top,
    opacity 0.85 x probability."""
    probs = np.zeros((4, 1, 2))
    probs[:, 0, 0] = [0.1, 0.6, 0.3, 0.0]     # best 1, then 2
    probs[:, 0, 1] = [0.5, 0.0, 0.1, 0.4]     # best 0, then 3
    base = np.zeros((8, 12), np.uint8)
    out = rgb(picture(base, probs, [axis(4, 8), axis(4, 8)], top=2))
    for j, (first, second) in enumerate([(1, 2), (0, 3)]):
        x = slice(2 + 4 * j, 6 + 4 * j)
        np.testing.assert_allclose(out[2:4, x], np.broadcast_to(np.array(CLASS[first]) * 0.85
                                                                 * probs[first, 0, j], (2, 4, 3)), atol=0.5)
        np.testing.assert_allclose(out[4:6, x], np.broadcast_to(np.array(CLASS[second]) * 0.85
                                                                 * probs[second, 0, j], (2, 4, 3)), atol=0.5)


def test_labels_are_written_in_cells_that_hold_them():
    probs = np.zeros((2, 2, 2))
    probs[0] = [[0.9, 0.2], [0.2, 0.2]]
    probs[1] = 1 - probs[0]
    out = rgb(picture(np.zeros((64, 64), np.uint8), probs, [axis(8, 8), axis(8, 8)], zoom=4, labels=["a", "b"]))
    # class 0's colour is dark: white text in cell (0, 0); the cell is otherwise one flat colour
    assert (out[:32, :32] == 255).all(axis=2).any()
    assert not (out[32:, :] == 255).all(axis=2).any()     # unlikely cells (0.8 of class 1) say "b"... in black
    no_text = rgb(picture(np.zeros((16, 16), np.uint8), probs, [axis(8, 8), axis(8, 8)], zoom=1, labels=["a", "b"]))
    assert not (no_text == 255).all(axis=2).any()      # 8-pixel cells are too small for a character


def reference(base, probs, axes, zoom, cls=None, top=1, sub=1):
    """The picture by brute force: paint every 1/sub input pixel with its
    cell's colour and opacity (cells start on multiples of 1/sub here), then
    average each picture pixel's block of sub-pixels."""
    (ay, ax), (h, w) = axes, base.shape[:2]
    factor = round(sub / zoom)                      # sub-pixels per picture pixel
    u = (np.arange(h * factor) + 0.5) / sub
    v = (np.arange(w * factor) + 0.5) / sub
    c0y = ay.offset + (ay.receptive_field - ay.stride) / 2
    c0x = ax.offset + (ax.receptive_field - ax.stride) / 2
    p, q = np.floor((u - c0y) / ay.stride).astype(int), np.floor((v - c0x) / ax.stride).astype(int)
    band = np.minimum(((u - c0y) / ay.stride - p) * top, top - 1).astype(int)
    inside = ((p >= 0) & (p < probs.shape[1]))[:, None] & ((q >= 0) & (q < probs.shape[2]))[None, :]
    pc, qc = np.clip(p, 0, probs.shape[1] - 1), np.clip(q, 0, probs.shape[2] - 1)
    colour = np.zeros((len(u), len(v), 3))
    alpha = np.zeros((len(u), len(v)))
    for y in range(len(u)):
        for x in range(len(v)):
            if not inside[y, x]:
                continue
            cell = probs[:, pc[y], qc[x]]
            if cls is not None:
                val = cell[cls]
                lo = max(k for k in ANCHORS if k <= val)
                hi = min(k for k in ANCHORS if k >= val)
                t = 0 if hi == lo else (val - lo) / (hi - lo)
                colour[y, x] = np.array(ANCHORS[lo]) * (1 - t) + np.array(ANCHORS[hi]) * t
                alpha[y, x] = 0.6
            else:
                k = sorted(range(len(cell)), key=lambda c: (-cell[c], c))[band[y]]
                colour[y, x] = CLASS[k]
                alpha[y, x] = 0.85 * cell[k]
    pre = (colour * alpha[..., None]).reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
    a = alpha.reshape(h, factor, w, factor).mean(axis=(1, 3))
    return base * (1 - a[..., None]) + pre


@pytest.mark.parametrize("case", ["aligned", "offset, half-pixel cells", "bands", "class scale"])
def test_cells_smaller_than_a_pixel_are_area_averaged(case):
    rng = np.random.default_rng(0)
    kw, top, sub, zoom = {}, 1, 1, 0.1
    if case == "aligned":
        axes, shape = [axis(1, 1), axis(1, 1)], (4, 60, 80)
    elif case == "offset, half-pixel cells":        # c0 = -3 + (6 - 3) / 2 = -1.5: cells start on half pixels
        axes, shape, sub = [axis(3, 6, -3), axis(3, 6, -3)], (4, 21, 27), 2
    elif case == "bands":                           # stride 4 in 2 bands, picture pixels of 5 input pixels
        axes, shape, top, zoom, kw = [axis(4, 8), axis(4, 8)], (4, 14, 19), 2, 0.2, {"top": 2}
    else:
        axes, shape, kw = [axis(2, 4), axis(2, 4)], (3, 29, 39), {"cls": 1}
    probs = rng.dirichlet(np.ones(shape[0]), size=shape[1:]).transpose(2, 0, 1)
    if case == "class scale":                       # values on the anchors and between them
        probs[1] = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.9], size=shape[1:])
    h, w = 6, 8
    base = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    got = rgb(picture(base, probs, axes, zoom=zoom, **kw))
    want = reference(base.astype(np.float64), probs, axes, zoom, cls=kw.get("cls"), top=top, sub=sub)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.51)
    assert np.abs(got - base).max() > 10          # the map is drawn, not only the image


def test_point_sampling_matches_the_reference_when_cells_span_pixels():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=(9, 11)).transpose(2, 0, 1)
    axes = [axis(2, 8), axis(2, 8)]
    base = rng.integers(0, 256, (48, 56, 3)).astype(np.uint8)     # zoom 2 of a 24 x 28 input
    got = rgb(picture(base, probs, axes, zoom=2, labels=[""] * 5))
    np.testing.assert_allclose(got, reference(base.astype(np.float64), probs, axes, 2, sub=2), atol=0.51)


def test_a_2000_by_2000_map_draws_in_seconds():
    rng = np.random.default_rng(2)
    probs = rng.random((3, 2000, 2000), dtype=np.float32)
    probs /= probs.sum(0)
    axes = [axis(16, 32), axis(16, 32)]
    timings = {}
    for zoom, top in [(0.01, 1), (0.01, 3), (1 / 16, 1)]:
        n = round(32016 * zoom)
        image = np.zeros((n, n), np.uint8)
        t0 = time.perf_counter()
        img = picture(image, probs, axes, zoom=zoom, top=top, legend=True)
        timings[(zoom, top)] = time.perf_counter() - t0
        assert img.size[0] == n
    assert max(timings.values()) < 30, timings


def test_gray_sixteen_bit_and_alpha_images():
    probs = np.full((2, 1, 1), 0.5)
    axes = [axis(4, 4), axis(4, 4)]
    img16 = np.array([[0, 1000], [2000, 4000]], np.uint16).repeat(2, 0).repeat(2, 1)
    out = rgb(picture(img16, probs, axes, cls=0))
    assert out.shape == (4, 4, 3)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    assert rgb(picture(rgba, probs, axes)).shape == (4, 4, 3)
    assert scaled(img16, 1).dtype == np.uint8 and scaled(img16, 1).max() == 255


@pytest.mark.parametrize("kwargs, needle", [({"cls": 2}, "class 2: the map has classes 0..1"),
                                            ({"cls": 0, "top": 1}, "not both"),
                                            ({"top": 3}, "top 3"),
                                            ({"zoom": 0}, "zoom 0"),
                                            ({"axes": 1}, "2 spatial axes"),
                                            ({"probs": np.zeros((2, 0, 3))}, "shape \\[2, 0, 3\\]")])
def test_bad_arguments_are_refused(kwargs, needle):
    axes = [axis(4, 4), axis(4, 4)][:kwargs.pop("axes", 2)]
    probs = kwargs.pop("probs", np.full((2, 1, 1), 0.5))
    with pytest.raises(Fc2ConvError, match=needle):
        picture(np.zeros((4, 4), np.uint8), probs, axes, **kwargs)
