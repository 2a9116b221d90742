"""`onnx-fc2conv heatmap`: the PNG is the image with each map position
painted over the centre of its window, the JSON agrees with the dense model
run here independently, and bad images exit 2 with one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from onnx_fc2conv import cli, convert
from onnx_fc2conv.draw import class_colour, colour_scale

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits.onnx"
VGG = ROOT / "models" / "vgg_small.onnx"
KERAS_NHWC = ROOT / "tests" / "fixtures" / "keras_flatten_dense_tf2onnx.onnx"


def heldout():
    with np.load(ROOT / "models" / "digits_heldout.npz") as z:
        return z["images"], z["labels"]


def canvas(places, size=(24, 48), first=0):
    """Held-out digits (stored 0..16) pasted at ``places`` (top-left corners)
    on black, as 8-bit pixels v*15 (0..240): --scale 1/240 gives the model
    exactly v/16, the values it was trained on."""
    images, labels = heldout()
    c = np.zeros(size, np.uint8)
    for k, (y, x) in enumerate(places):
        c[y:y + 8, x:x + 8] = images[first + k] * 15
    return c, labels[first:first + len(places)]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def softmax(s):
    e = np.exp(s - s.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def dense_scores(model, x):
    """The score map computed here: convert to dense, run in onnxruntime."""
    dense = convert(model, dense=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(dense.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = dense.model.graph.input[0].name
    return sess.run(None, {name: x})[0][0], dense.geometry[0]


PLACES = [(2, 2), (4, 14), (12, 30), (14, 4), (8, 38)]


@pytest.fixture
def digits_canvas(tmp_path):
    pixels, labels = canvas(PLACES)
    path = tmp_path / "canvas.png"
    Image.fromarray(pixels).save(path)
    return path, pixels, labels


def test_top1_png_and_json_agree_with_the_dense_model(digits_canvas, tmp_path, capsys):
    path, pixels, labels = digits_canvas
    out, js, zoom = tmp_path / "map.png", tmp_path / "map.json", 8
    code, stdout, err = run(["heatmap", DIGITS, path, "-o", out, "--scale", "1/240", "--zoom", zoom, "--json", js],
                            capsys)
    assert code == 0, err
    assert err == ""    # no progress when stderr is not a terminal
    assert "map 9x21 of 10 classes (stride 2, window 8 px)" in stdout
    x = (pixels.astype(np.float32) / 16 / 15)[None, None]
    scores, geometry = dense_scores(DIGITS, x)
    assert scores.shape == (10, 9, 21)
    report = json.loads(js.read_text())
    np.testing.assert_allclose(np.array(report["scores"]), scores, rtol=1e-6, atol=1e-6)
    assert report["geometry"]["axes"] == geometry["axes"]
    assert report["map_size"] == [9, 21] and report["image_size"] == [24, 48] and report["layout"] == "NCHW"
    probs = softmax(scores.astype(np.float64))
    top1 = np.array([[cell[0]["class"] for cell in row] for row in report["top"]])
    np.testing.assert_array_equal(top1, probs.argmax(0))
    # each pasted digit's window is position (y/2, x/2): its label there
    for (y, x), label in zip(PLACES, labels):
        assert top1[y // 2, x // 2] == label

    png = np.asarray(Image.open(out).convert("RGB"))
    h, w = pixels.shape
    assert png.shape == (h * zoom, w * zoom, 3)      # the image times --zoom, no legend without --legend
    image = np.repeat(np.repeat(np.repeat(pixels[..., None], 3, 2), zoom, 0), zoom, 1)
    area = png[:h * zoom, :w * zoom].astype(int)
    # the margin no window is centred on, (rf - stride)/2 = 3 px, shows the image as it is
    margin = np.ones((h * zoom, w * zoom), bool)
    margin[3 * zoom:(3 + 2 * 9) * zoom, 3 * zoom:(3 + 2 * 21) * zoom] = False
    np.testing.assert_array_equal(area[margin], image[margin])
    # position (i, j) paints its 2x2 centre cell, from pixel (3 + 2i, 3 + 2j), in its class colour,
    # opacity 0.85 * probability (checked at the cell's corner, away from the drawn digit)
    for i in range(9):
        for j in range(21):
            k = probs[:, i, j].argmax()
            a = 0.85 * probs[k, i, j]
            yy, xx = (3 + 2 * i) * zoom + 1, (3 + 2 * j) * zoom + 1
            want = np.rint(image[yy, xx] * (1 - a) + np.array(class_colour(k)) * a)
            np.testing.assert_allclose(area[yy, xx], want, atol=1)


def test_class_map_paints_the_probability_of_one_class(digits_canvas, tmp_path, capsys):
    path, pixels, labels = digits_canvas
    out, js = tmp_path / "c.png", tmp_path / "c.json"
    k = int(labels[1])
    code, _, err = run(["heatmap", DIGITS, path, "-o", out, "--scale", "1/240", "--class", k, "--zoom", 4,
                        "--json", js], capsys)
    assert code == 0, err
    scores, _ = dense_scores(DIGITS, (pixels.astype(np.float32) / 240)[None, None])
    p = softmax(scores.astype(np.float64))[k]
    png = np.asarray(Image.open(out).convert("RGB")).astype(float)
    for i in range(9):
        for j in range(21):
            yy, xx = (3 + 2 * i) * 4 + 1, (3 + 2 * j) * 4 + 1
            want = pixels[(3 + 2 * i), (3 + 2 * j)] * 0.4 + colour_scale(p[i, j]) * 0.6
            np.testing.assert_allclose(png[yy, xx], want, atol=1)
    y, x = PLACES[1]
    assert p[y // 2, x // 2] == p.max() and p.max() > 0.9
    assert json.loads(js.read_text())["class"] == k


def test_top_n_bands_and_dense_input_model(digits_canvas, tmp_path, capsys):
    """A model that is dense already is used as it is, with the same map."""
    path, pixels, _ = digits_canvas
    dense_path = tmp_path / "dense.onnx"
    onnx.save(convert(DIGITS, dense=True).model, dense_path)
    js1, js2 = tmp_path / "a.json", tmp_path / "b.json"
    assert run(["heatmap", DIGITS, path, "-o", tmp_path / "a.png", "--scale", "1/240", "--top", 3, "--json", js1],
               capsys)[0] == 0
    code, stdout, err = run(["heatmap", dense_path, path, "-o", tmp_path / "b.png", "--scale", "1/240",
                             "--top", 3, "--json", js2], capsys)
    assert code == 0, err
    assert "dense already" in stdout
    a, b = json.loads(js1.read_text()), json.loads(js2.read_text())
    assert a["scores"] == b["scores"] and a["top"] == b["top"] and not b["converted_to_dense"]
    assert all(len(cell) == 3 for row in a["top"] for cell in row)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_rgb_padded_model_with_mean_std_and_resize(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path, js = tmp_path / "rgb.png", tmp_path / "v.json"
    Image.fromarray(img).save(path)
    code, _, err = run(["heatmap", VGG, path, "-o", tmp_path / "v.png", "--mean", "0.5,0.4,0.3", "--std", "0.25",
                        "--size", "48,64", "--json", js], capsys)
    assert code == 0, err
    resized = np.asarray(Image.fromarray(img).resize((64, 48), Image.Resampling.BILINEAR)).astype(np.float64)
    x = ((resized / 255 - [0.5, 0.4, 0.3]) / 0.25).transpose(2, 0, 1)[None].astype(np.float32)
    scores, geometry = dense_scores(VGG, x)
    report = json.loads(js.read_text())
    assert report["map_size"] == [3, 5] and report["probability"] == "model output"  # vgg_small ends in Softmax
    np.testing.assert_allclose(np.array(report["scores"]), scores, rtol=1e-5, atol=1e-6)
    assert report["geometry"]["axes"][0]["offset"] == -14
    assert Image.open(tmp_path / "v.png").size == (64, 48)     # the image (resized) as it is, not padded
    assert report["png"]["image_box"] == [0, 0, 64, 48]


def test_nhwc_model(tmp_path, capsys):
    """tf2onnx's Keras model takes [N,H,W,C]: the image goes in as it is."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
    path, js = tmp_path / "rgb.png", tmp_path / "k.json"
    Image.fromarray(img).save(path)
    code, _, err = run(["heatmap", KERAS_NHWC, path, "-o", tmp_path / "k.png", "--json", js], capsys)
    assert code == 0, err
    scores, _ = dense_scores(KERAS_NHWC, (img.astype(np.float64) / 255)[None].astype(np.float32))
    report = json.loads(js.read_text())
    assert report["layout"] == "NHWC"
    np.testing.assert_allclose(np.array(report["scores"]), scores, rtol=1e-5, atol=1e-6)


def cli_subprocess(*args, code=None):
    cmd = [sys.executable, "-c", code or "from onnx_fc2conv.cli import main; raise SystemExit(main())",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def assert_refused(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("case", ["missing", "not an image", "truncated", "colour for a gray model",
                                  "gray for an RGB model", "directory"])
def test_bad_images_exit_2_with_one_line(case, tmp_path, capsys):
    out = tmp_path / "out.png"
    model, image = DIGITS, tmp_path / "img.png"
    rng = np.random.default_rng(0)
    if case == "missing":
        needles = ("img.png: no such file",)
    elif case == "not an image":
        image.write_bytes(b"these are not pixels\n")
        needles = ("img.png: not an image",)
    elif case == "truncated":
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(image)
        image.write_bytes(image.read_bytes()[:200])
        needles = ("img.png: cannot read the image",)
    elif case == "colour for a gray model":
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
        needles = ("img.png: a colour (RGB) image, but the model's input has 1 channel",)
    elif case == "gray for an RGB model":
        model = VGG
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(image)
        needles = ("img.png: a grayscale image (1 channel), but the model's input has 3 channels",)
    else:
        image = tmp_path
        needles = ("is a directory",)
    code, stdout, err = run(["heatmap", model, image, "-o", out, "--json", tmp_path / "o.json"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "o.json").exists()


def test_gray_pixels_stored_as_rgb_are_gray(digits_canvas, tmp_path, capsys):
    path, pixels, _ = digits_canvas
    rgb = tmp_path / "rgb.png"
    Image.fromarray(pixels).convert("RGB").save(rgb)
    assert run(["heatmap", DIGITS, path, "-o", tmp_path / "a.png", "--scale", "1/240", "--json", tmp_path / "a.json"],
               capsys)[0] == 0
    assert run(["heatmap", DIGITS, rgb, "-o", tmp_path / "b.png", "--scale", "1/240", "--json", tmp_path / "b.json"],
               capsys)[0] == 0
    assert json.loads((tmp_path / "a.json").read_text())["scores"] == \
        json.loads((tmp_path / "b.json").read_text())["scores"]


def test_subprocess_error_has_no_traceback(tmp_path):
    r = cli_subprocess("heatmap", DIGITS, tmp_path / "nope.png", "-o", tmp_path / "o.png")
    assert_refused(r, "nope.png: no such file")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("case", ["smaller than the window", "output is the image", "1-D model", "bad --scale",
                                  "wrong --mean count", "--top too large"])
def test_usage_errors_exit_2_with_one_line(case, digits_canvas, tmp_path, capsys):
    path, _, _ = digits_canvas
    out = tmp_path / "o.png"
    model, image, extra = DIGITS, path, []
    if case == "smaller than the window":
        image = tmp_path / "small.png"
        Image.fromarray(np.zeros((6, 6), np.uint8)).save(image)
        needles = ("small.png", "8x8 window")
    elif case == "output is the image":
        out = path
        needles = ("would overwrite the input",)
    elif case == "1-D model":
        model = ROOT / "models" / "conv1d_net.onnx"
        needles = ("heatmap draws 2-D images; the model's score map has 1 spatial axis",)
    elif case == "bad --scale":
        extra, needles = ["--scale", "1/0"], ("--scale '1/0': write a number or a fraction such as 1/255",)
    elif case == "wrong --mean count":
        extra, needles = ["--mean", "0.1,0.2"], ("--mean '0.1,0.2': 2 values for a model with 1 channel(s)",)
    else:
        extra, needles = ["--top", "11"], ("--top 11: the model has only 10 classes",)
    before = path.read_bytes()
    code, _, err = run(["heatmap", model, image, "-o", out] + extra, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert path.read_bytes() == before
    assert out == path or not out.exists()


def test_missing_pillow_names_the_install(digits_canvas, tmp_path):
    path, _, _ = digits_canvas
    code = ("import sys; sys.modules['PIL'] = None\n"
            "from onnx_fc2conv.cli import main; raise SystemExit(main())")
    r = cli_subprocess("heatmap", DIGITS, path, "-o", tmp_path / "o.png", code=code)
    assert_refused(r, "pip install pillow")
    assert not (tmp_path / "o.png").exists()


def test_dense_stride_1_map_is_the_classifier_on_every_crop(tmp_path, capsys):
    """With --dense-stride 1 every pixel offset has a position: on the digits
    model (no padding) position (i, j) is the original classifier on the 8x8
    crop at (i, j), digits pasted at odd places included; a dense model given
    as it is gets the same map."""
    places = [(1, 1), (3, 13), (11, 29), (15, 5), (7, 39)]
    pixels, labels = canvas(places)
    path = tmp_path / "odd.png"
    Image.fromarray(pixels).save(path)
    js = tmp_path / "fine.json"
    code, stdout, err = run(["heatmap", DIGITS, path, "-o", tmp_path / "fine.png", "--scale", "1/240",
                             "--dense-stride", "1", "--zoom", 4, "--json", js], capsys)
    assert code == 0, err
    assert "map 17x41 of 10 classes (stride 1, window 8 px)" in stdout
    report = json.loads(js.read_text())
    scores = np.array(report["scores"])
    x = pixels.astype(np.float32) / 240
    crops = np.stack([x[i:i + 8, j:j + 8] for i in range(17) for j in range(41)])[:, None]
    sess = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"image": crops})[0].reshape(17, 41, 10).transpose(2, 0, 1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    for (y, x0), label in zip(places, labels):
        assert scores[:, y, x0].argmax() == label
    assert report["geometry"]["axes"][0]["stride"] == 1 and report["geometry"]["axes"][0]["plain_stride"] == 2
    dense_path = tmp_path / "dense.onnx"
    onnx.save(convert(DIGITS, dense=True).model, dense_path)
    js2 = tmp_path / "fine2.json"
    assert run(["heatmap", dense_path, path, "-o", tmp_path / "fine2.png", "--scale", "1/240", "--dense-stride", "1",
                "--json", js2], capsys)[0] == 0
    np.testing.assert_allclose(np.array(json.loads(js2.read_text())["scores"]), scores, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ size ---

def test_picture_is_the_image_times_zoom(tmp_path, capsys):
    """Issue 19: the 40x96 demo canvas at the default zoom gave a 240x115
    picture (padded to the legend's width, a strip below). Now the image
    times --zoom exactly; the strip only with --legend, as wide as the image."""
    canvas = ROOT / "docs" / "digits_canvas.png"
    sizes = {}
    for extra in ([], ["--zoom", "0.5"], ["--zoom", "2.5"], ["--legend"], ["--zoom", "3", "--legend"]):
        out = tmp_path / "p.png"
        code, _, err = run(["heatmap", DIGITS, canvas, "-o", out, "--scale", "1/240"] + extra, capsys)
        assert code == 0, err
        sizes[" ".join(extra)] = Image.open(out).size
    assert sizes[""] == (96, 40) and sizes["--zoom 0.5"] == (48, 20) and sizes["--zoom 2.5"] == (240, 100)
    assert sizes["--legend"][0] == 96 and sizes["--legend"][1] > 40
    assert sizes["--zoom 3 --legend"][0] == 288 and sizes["--zoom 3 --legend"][1] > 120


@pytest.mark.parametrize("zoom", ["0", "-1", "65", "nan"])
def test_bad_zoom_exits_2(zoom, digits_canvas, tmp_path, capsys):
    path, _, _ = digits_canvas
    code, _, err = run(["heatmap", DIGITS, path, "-o", tmp_path / "o.png", f"--zoom={zoom}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--zoom" in err, err
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------- several outputs ---

def _init(name, value):
    return onnx.numpy_helper.from_array(np.asarray(value, np.float32), name)


def two_head_classifier(path):
    """An MTCNN-like net on 12x12 RGB crops: a trunk (Conv 3x3, MaxPool 2),
    then two FC heads on its map: 'box' (4 values, first in the graph's
    outputs) and 'prob' (2 classes through Softmax)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    inits = [_init("cw", rng.standard_normal((4, 3, 3, 3)) * 0.5), _init("cb", rng.standard_normal(4) * 0.1),
             _init("wp", rng.standard_normal((2, 100)) * 0.3), _init("bp", [0.1, -0.1]),
             _init("wb", rng.standard_normal((4, 100)) * 0.3), _init("bb", rng.standard_normal(4) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "wp", "bp"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
             helper.make_node("Gemm", ["f", "wb", "bb"], ["box"], transB=1)]
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])
    graph = helper.make_graph(nodes, "two_heads", [image],
                              [helper.make_tensor_value_info("box", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def forked_head_classifier(path):
    """MTCNN's R-Net/O-Net shape: the trunk of :func:`two_head_classifier`,
    one shared FC (100 -> 16, Relu), then three FC outputs on it: 'box' (4),
    'prob' (2 classes through Softmax) and 'landmarks' (10)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    inits = [_init("cw", rng.standard_normal((4, 3, 3, 3)) * 0.5), _init("cb", rng.standard_normal(4) * 0.1),
             _init("w0", rng.standard_normal((16, 100)) * 0.3), _init("b0", rng.standard_normal(16) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w0", "b0"], ["h0"], transB=1),
             helper.make_node("Relu", ["h0"], ["h"])]
    outputs = []
    for name, k in [("box", 4), ("prob", 2), ("landmarks", 10)]:
        inits += [_init(f"w_{name}", rng.standard_normal((k, 16)) * 0.5), _init(f"b_{name}", np.zeros(k))]
        last = "logits" if name == "prob" else name
        nodes.append(helper.make_node("Gemm", ["h", f"w_{name}", f"b_{name}"], [last], transB=1))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", k]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], axis=1))
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])
    model = helper.make_model(helper.make_graph(nodes, "forked", [image], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def two_output_fcn(path, softmax=True, mean=False):
    """A fully convolutional net with two outputs: 'score' (2 channels,
    through Softmax over the channels unless ``softmax`` is False) and
    'box' (4 channels), both 1x1 Convs on a stride-2 trunk; with ``mean``
    also 'mean', the trunk averaged over the whole image (not a map)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    inits = [_init("cw", rng.standard_normal((4, 3, 3, 3)) * 0.5), _init("cb", np.zeros(4)),
             _init("sw", rng.standard_normal((2, 4, 1, 1))), _init("sb", [0.2, -0.2]),
             _init("bw", rng.standard_normal((4, 4, 1, 1))), _init("bb", np.zeros(4))]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "sw", "sb"], ["s"] if softmax else ["score"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["r", "bw", "bb"], ["box"], kernel_shape=[1, 1])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["s"], ["score"], axis=1))
    outputs = [helper.make_tensor_value_info("box", TensorProto.FLOAT, [1, 4, "h", "w"]),
               helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 2, "h", "w"])]
    if mean:
        nodes.append(helper.make_node("GlobalAveragePool", ["r"], ["mean"]))
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 4, 1, 1]))
    graph = helper.make_graph(nodes, "fcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def expected_maps(kind, model, x):
    """Every output's map computed here without the tool: the classifier on
    each 12x12 window (stride 2), or the fully convolutional net run as it is."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    if kind == "fcn":
        return {o.name: v[0] for o, v in zip(sess.get_outputs(), sess.run(None, {"x": x}))}
    h, w = (x.shape[2] - 12) // 2 + 1, (x.shape[3] - 12) // 2 + 1
    crops = np.concatenate([x[:, :, 2 * i:2 * i + 12, 2 * j:2 * j + 12] for i in range(h) for j in range(w)])
    return {o.name: v.reshape(h, w, -1).transpose(2, 0, 1)
            for o, v in zip(sess.get_outputs(), sess.run(None, {"x": crops}))}


@pytest.mark.parametrize("kind", ["two FC heads", "fcn", "forked heads"])
def test_several_outputs_draw_the_probabilities_and_keep_every_map(kind, tmp_path, capsys):
    build = {"two FC heads": two_head_classifier, "fcn": two_output_fcn, "forked heads": forked_head_classifier}
    model = build[kind](tmp_path / "m.onnx")
    prob = "prob" if kind != "fcn" else "score"
    others = ", ".join(repr(o.name) for o in onnx.load(model).graph.output if o.name != prob)
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    code, stdout, err = run(["heatmap", model, tmp_path / "img.png", "-o", png, "--json", js, "--zoom", 4], capsys)
    assert code == 0, err
    assert f"drew output '{prob}' (its values are probabilities over its class axis); also in --json: {others}" \
        in stdout
    report = json.loads(js.read_text())
    want = expected_maps(kind, model, (img.astype(np.float32) / 255).transpose(2, 0, 1)[None])
    assert report["output"] == prob and set(report["outputs"]) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(np.array(report["outputs"][name]["scores"]), value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(report["scores"]), want[prob], rtol=1e-5, atol=1e-5)
    assert report["outputs"][prob]["probabilities"] and not report["outputs"]["box"]["probabilities"]
    # the picture paints the probability map: each cell in its best class's colour, 0.85 x its probability
    geometry = report["geometry"]["axes"][0]
    c0 = geometry["offset"] + (geometry["receptive_field"] - geometry["stride"]) / 2
    pic = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert pic.shape == (120, 136, 3)
    p = want[prob]
    for i in range(p.shape[1]):
        for j in range(p.shape[2]):
            y, x = int((c0 + 2 * i) * 4) + 1, int((c0 + 2 * j) * 4) + 1
            if y >= 120 or x >= 136:
                continue
            k = int(p[:, i, j].argmax())
            a = 0.85 * p[k, i, j]
            base = img[y // 4, x // 4].astype(float)
            np.testing.assert_allclose(pic[y, x], base * (1 - a) + np.array(class_colour(k)) * a, atol=1)


def test_output_names_the_map_to_draw(tmp_path, capsys):
    model = two_head_classifier(tmp_path / "m.onnx")
    img = np.random.default_rng(6).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    js = tmp_path / "b.json"
    code, stdout, err = run(["heatmap", model, tmp_path / "img.png", "-o", tmp_path / "b.png", "--output", "box",
                             "--json", js, "--class", 3], capsys)
    assert code == 0, err
    assert "drew output 'box' (named with --output); also in --json: 'prob'" in stdout
    report = json.loads(js.read_text())
    want = expected_maps("heads", model, (img.astype(np.float32) / 255).transpose(2, 0, 1)[None])
    assert report["output"] == "box" and report["probability"] == "softmax of the scores" and report["classes"] == 4
    np.testing.assert_allclose(np.array(report["scores"]), want["box"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["no such output", "not a map", "no probabilities"])
def test_output_refusals_exit_2_with_one_line(case, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(img)
    extra = []
    if case == "no such output":
        model, extra = two_head_classifier(tmp_path / "m.onnx"), ["--output", "nope"]
        needle = "--output 'nope': the model has no such output; its outputs are 'box', 'prob'"
    elif case == "not a map":
        model, extra = two_output_fcn(tmp_path / "m.onnx", mean=True), ["--output", "mean"]
        needle = "--output 'mean' is not a score map over the image; the score maps are 'box', 'score'"
    else:
        model = two_output_fcn(tmp_path / "m.onnx", softmax=False)
        needle = ("2 score-map outputs ('box', 'score') and none holds probabilities over its class axis; "
                  "name the one to draw with --output NAME")
    out = tmp_path / "o.png"
    code, _, err = run(["heatmap", model, img, "-o", out] + extra, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()
    if case == "no probabilities":
        code, stdout, err = run(["heatmap", model, img, "-o", out, "--output", "score"], capsys)
        assert code == 0 and out.exists(), err


# ------------------------------------------- images too large for one pass ---

MEASURE = """
import sys
import numpy as np
from onnx_fc2conv.check.run import session
from onnx_fc2conv.heatmap import one_pass_bytes, prepare
def status(key):
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key + ":"))
prep = prepare(sys.argv[1])
n = int(sys.argv[2])
shape = (1, prep.channels, n, n) if prep.layout == "NCHW" else (1, n, n, prep.channels)
x = np.random.default_rng(0).random(shape, dtype=np.float32)
sess = session(prep.model, "cpu", "the dense model")
open("/proc/self/clear_refs", "w").write("5")     # the peak (VmHWM) starts again from here
before = status("VmRSS")
sess.run(None, {prep.input: x})
print(status("VmHWM") - before + x.nbytes, one_pass_bytes(prep, n, n))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the resident set from /proc (Linux)")
@pytest.mark.parametrize("model,n", [(VGG, 1024), (DIGITS, 512)], ids=["vgg_small-1024", "digits-512"])
def test_one_pass_memory_estimate_is_within_2x_of_the_measured_peak(model, n):
    """The estimate heatmap compares with free memory, against the peak RSS one onnxruntime pass adds (the input
    counted in both), in a fresh process, the peak reset just before the run."""
    r = subprocess.run([sys.executable, "-c", MEASURE, str(model), str(n)], cwd=ROOT, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    measured, estimate = map(int, r.stdout.split())
    assert 0.5 <= measured / estimate <= 2, (measured, estimate)


def _one_line_naming_scan(code, err, model, image, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"onnx-fc2conv scan {model} {image} -o {Path(image).stem}.zarr" in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_an_image_too_large_for_free_memory_points_to_scan(tmp_path, capsys, monkeypatch):
    from onnx_fc2conv import heatmap as hm

    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128), dtype=np.uint8)).save(image)
    out, js = tmp_path / "out.png", tmp_path / "o.json"
    argv = ["heatmap", DIGITS, image, "-o", out, "--json", js]
    monkeypatch.setattr(hm, "available_memory", lambda: 300_000)
    code, _, err = run(argv, capsys)
    _one_line_naming_scan(code, err, DIGITS, image, "one pass of the dense model over this 96x128 image needs about",
                          "and 0.30 MB is free")
    assert not out.exists() and not js.exists()
    need = hm.one_pass_bytes(hm.prepare(DIGITS), 96, 128)
    monkeypatch.setattr(hm, "available_memory", lambda: need)     # just enough: it runs
    assert run(argv, capsys)[0] == 0 and out.exists()


def test_a_decompression_bomb_points_to_scan(tmp_path, capsys, monkeypatch):
    image = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)    # Pillow refuses above twice this
    code, _, err = run(["heatmap", DIGITS, image, "-o", tmp_path / "out.png"], capsys)
    _one_line_naming_scan(code, err, DIGITS, image, "decompression bomb")
    assert not (tmp_path / "out.png").exists()


OOM = """
import os, resource, sys
from onnx_fc2conv import cli
import onnx_fc2conv.check.run, onnx_fc2conv.draw, onnx_fc2conv.heatmap, onnxruntime, PIL.Image  # loaded before
resource.setrlimit(resource.RLIMIT_STACK, (1 << 20, 1 << 20))   # onnxruntime's threads: small stacks
vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
limit = vm + (100 << 20)      # the 1024^2 pass needs about 80 MB of activations, the picture more
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="limits the address space (Linux)")
def test_onnxruntime_out_of_memory_points_to_scan(tmp_path):
    """A real allocation failure inside onnxruntime (the address space limited): one line naming scan."""
    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out.png"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run([sys.executable, "-c", OOM, "heatmap", str(VGG), str(image), "-o", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    _one_line_naming_scan(r.returncode, r.stderr, VGG, image, "onnxruntime ran out of memory", "1024x1024")
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="limits the address space (Linux)")
def test_drawing_out_of_memory_is_one_line_naming_zoom(tmp_path):
    """A real allocation failure while drawing (the address space limited to what the 200x200 pass needs, far
    below the 8000x8000 picture of --zoom 40): one line naming the picture and --zoom, no PNG."""
    image = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(image)
    before = image.read_bytes()
    out = tmp_path / "out.png"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run([sys.executable, "-c", OOM, "heatmap", str(VGG), str(image), "-o", str(out), "--zoom", "40"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"onnx-fc2conv: error: {out}: drawing the 8000x8000 px picture needs more memory"), \
        lines[0]
    assert "a lower --zoom (now 40)" in lines[0], lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [image] and image.read_bytes() == before
