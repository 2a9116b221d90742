"""The trained sample models/digits.onnx (tools/train_digits.py): its
held-out accuracy in onnxruntime, on the split stored beside it."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits.onnx"
HELDOUT = ROOT / "models" / "digits_heldout.npz"


def heldout():
    """Held-out images as the model sees them ([N,1,8,8] float32 in [0,1]) and labels."""
    with np.load(HELDOUT) as z:
        return z["images"][:, None].astype(np.float32) / 16.0, z["labels"], z["indices"]


def test_heldout_split_is_what_the_readme_states():
    x, y, idx = heldout()
    assert x.shape == (450, 1, 8, 8) and y.shape == (450,)
    assert len(set(idx.tolist())) == 450 and idx.min() >= 0 and idx.max() < 1797
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y, minlength=10).min() >= 43   # stratified: 10 classes, 43..46 each


def test_model_interface():
    m = onnx.load(MODEL)
    onnx.checker.check_model(m, full_check=True)
    assert MODEL.stat().st_size < 200_000
    (inp,), (out,) = m.graph.input, m.graph.output
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "image" and dims[1:] == [1, 8, 8] and isinstance(dims[0], str)
    assert out.name == "logits"
    for n in m.graph.node:   # the trunk has no padding: a dense window is the classifier on a crop
        for a in n.attribute:
            if a.name == "pads":
                assert not any(a.ints), n.name


def test_heldout_accuracy_in_onnxruntime():
    x, y, _ = heldout()
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": x})[0]
    assert logits.shape == (450, 10)
    accuracy = float((logits.argmax(1) == y).mean())
    assert accuracy >= 0.95, accuracy
