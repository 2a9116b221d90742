"""The README's demo (tools/demo_heatmap.py), and localisation: on canvases
of pasted held-out digits, the dense map at each digit's window says its
label as often as the classifier does on the crops, and says exactly what the
classifier says there."""

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from onnx_fc2conv.heatmap import heatmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import demo_heatmap as demo  # noqa: E402

DIGITS = ROOT / "models" / "digits.onnx"


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_committed_canvas_is_what_the_tool_makes():
    canvas, picks = demo.demo_canvas()
    _, labels = demo.heldout()
    assert [int(labels[i]) for i in picks] == list(range(10))
    committed = np.asarray(Image.open(ROOT / demo.CANVAS))
    assert committed.shape == canvas.shape == demo.SIZE
    np.testing.assert_array_equal(committed, canvas)


def test_committed_heatmap_is_what_the_command_writes(tmp_path):
    args = shlex.split(demo.COMMAND)
    assert args[0] == "onnx-fc2conv"
    out = tmp_path / "heatmap.png"
    args[args.index("-o") + 1] = str(out)
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv"] + args[1:], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got, committed = pixels(out), pixels(ROOT / demo.HEATMAP)
    assert got.shape == committed.shape
    assert np.array_equal(got, committed), f"{int(np.sum(np.any(got != committed, axis=2)))} pixels differ"
    assert (ROOT / demo.HEATMAP).stat().st_size < 100_000


def crops_classified(canvas, places):
    """What the original classifier says on each pasted digit's 8x8 crop: scores [n, 10]."""
    x = np.stack([canvas[y:y + 8, x:x + 8] for y, x in places]).astype(np.float32)[:, None] / 240
    sess = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def localise(tmp_path, dense_stride=None, even=True):
    images, labels = demo.heldout()
    # all 450 held-out digits, 10 a row in 10-pixel cells, each moved by 0..2 pixels
    canvas, places = demo.random_canvas(range(len(labels)), size=(450, 100), seed=1, even=even)
    path = tmp_path / "canvas.png"
    Image.fromarray(canvas).save(path)
    hm = heatmap(DIGITS, path, scale="1/240", dense_stride=dense_stride)
    stride = hm.axes[0].stride
    at_windows = np.stack([hm.scores[:, y // stride, x // stride] for y, x in places])
    assert all(y % stride == 0 and x % stride == 0 for y, x in places)
    on_crops = crops_classified(canvas, places)
    np.testing.assert_allclose(at_windows, on_crops, rtol=1e-5, atol=1e-5)
    assert np.array_equal(at_windows.argmax(1), on_crops.argmax(1))
    return float((at_windows.argmax(1) == labels).mean()), len(labels)


def test_localisation_on_450_pasted_heldout_digits(tmp_path):
    accuracy, n = localise(tmp_path)
    assert n >= 100 and accuracy >= 0.9, accuracy


def test_localisation_at_odd_places_with_dense_stride_1(tmp_path):
    accuracy, n = localise(tmp_path, dense_stride=1, even=False)
    assert n >= 100 and accuracy >= 0.9, accuracy
