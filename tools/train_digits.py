"""Train the sample classifier models/digits.onnx (dev only: torch + scikit-learn).

The data is scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``,
1797 images, shipped inside scikit-learn: no download). Pixels 0..16 are divided
by 16, so the model sees white digits on black in [0, 1].

Split: ``train_test_split(test_size=0.25, random_state=0, stratify=labels)``,
1347 training and 450 held-out images. The held-out images (as their integer
0..16 values), labels and indices into ``load_digits()`` are written to
models/digits_heldout.npz so the tests and tools/demo_heatmap.py need neither
scikit-learn nor torch.

Model (``image`` float32 [N,1,8,8] -> ``logits`` [N,10]); the trunk has no
padding, so a dense window is exactly the classifier on an 8x8 crop (offset 0),
and its stride is 2 (the pool)::

    Conv 3x3 (16) -> Relu -> Conv 3x3 (32) -> Relu -> MaxPool 2 s2   # 8 -> 6 -> 4 -> 2
    Flatten -> Linear 128->64 -> Relu -> Linear 64->10

Training set: the 1347 training images, plus two copies moved by up to one
pixel per axis (labels kept), plus half as many negatives (see ``negatives``:
windows 3 to 8 pixels off a digit, between digits, or blank) whose target is
the uniform distribution over the 10 classes. A window on which no digit is
centred is then unsure, so a dense map over a page lights up where the digits
are (the held-out test set is the plain centred images).

Training: Adam (lr 3e-3 with cosine decay to 0, weight decay 1e-4), batch 32, 40 epochs, CPU, one
thread, ``torch.manual_seed(0)`` and deterministic algorithms, so a rerun
writes the same weights. Export: TorchScript exporter, opset 17, free batch.

    python3 -m venv /work/venvs/digits
    /work/venvs/digits/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime
    /work/venvs/digits/bin/python tools/train_digits.py            # writes models/digits.onnx + digits_heldout.npz
    /work/venvs/digits/bin/python tools/train_digits.py --out /tmp # somewhere else

It prints the held-out accuracy of the torch model and of the ONNX file in
onnxruntime (they must agree), and the run time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
EPOCHS = 40
BATCH = 32


def split():
    """(train images, train labels, held-out images 0..16 uint8, held-out labels, held-out indices)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)            # [1797, 8, 8], 0..16
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    tr, te = train_test_split(index, test_size=0.25, random_state=0, stratify=labels)
    return images[tr], labels[tr], images[te], labels[te], te


def shifted(images: np.ndarray, rng, max_shift: int = 1) -> np.ndarray:
    """Each image moved by up to ``max_shift`` pixels per axis (zeros enter): the positives."""
    n = len(images)
    pad = np.zeros((n, 8 + 2 * max_shift, 8 + 2 * max_shift), images.dtype)
    pad[:, max_shift:max_shift + 8, max_shift:max_shift + 8] = images
    d = rng.integers(0, 2 * max_shift + 1, size=(n, 2))
    return np.stack([pad[i, d[i, 0]:d[i, 0] + 8, d[i, 1]:d[i, 1] + 8] for i in range(n)])


def negatives(images: np.ndarray, n: int, rng) -> np.ndarray:
    """Windows on which no digit is centred: a 24x24 black canvas with a digit
    in the middle block and, with probability 1/2 each, digits in the 8
    blocks around it (moved by up to 2 pixels, so gaps vary), seen through an
    8x8 window that is 3 to 8 pixels off the middle digit on at least one
    axis; one in ten is blank."""
    out = np.zeros((n, 8, 8), images.dtype)
    for i in range(n):
        if rng.random() < 0.1:
            continue
        canvas = np.zeros((28, 28), images.dtype)
        for by in range(3):
            for bx in range(3):
                if (by, bx) != (1, 1) and rng.random() < 0.5:
                    continue
                jitter = (0, 0) if (by, bx) == (1, 1) else rng.integers(-2, 3, size=2)
                y, x = 2 + 8 * by + jitter[0], 2 + 8 * bx + jitter[1]
                np.maximum(canvas[y:y + 8, x:x + 8], images[rng.integers(len(images))], out=canvas[y:y + 8, x:x + 8])
        while True:
            dy, dx = rng.integers(-8, 9, size=2)
            if max(abs(dy), abs(dx)) >= 3:
                break
        out[i] = canvas[10 + dy:18 + dy, 10 + dx:18 + dx]
    return out


def build():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(),
        nn.Conv2d(16, 32, 3), nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(1),
        nn.Linear(32 * 2 * 2, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "models"), help="folder for digits.onnx and digits_heldout.npz")
    args = ap.parse_args(argv)

    import torch

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_te, y_te, idx_te = split()
    rng = np.random.default_rng(SEED)
    pos = np.concatenate([x_tr, shifted(x_tr, rng), shifted(x_tr, rng)])
    neg = negatives(x_tr, len(pos) // 2, rng)
    xt = torch.from_numpy(np.concatenate([pos, neg])[:, None].astype(np.float32) / 16.0)
    yt = torch.from_numpy(np.concatenate([np.tile(y_tr, 3), np.full(len(neg), -1)]))
    xe = torch.from_numpy(x_te[:, None].astype(np.float32) / 16.0)

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            b = perm[i:i + BATCH]
            opt.zero_grad()
            logits, labels = model(xt[b]), yt[b]
            lsm = torch.log_softmax(logits, 1)
            # positives: cross-entropy with their label; negatives: with the uniform distribution
            per_image = torch.where(labels >= 0, -lsm.gather(1, labels.clamp(min=0)[:, None])[:, 0], -lsm.mean(1))
            loss = per_image.mean()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            model.eval()
            with torch.no_grad():
                acc = float((model(xe).argmax(1).numpy() == y_te).mean())
            print(f"epoch {epoch + 1:3d}: train loss {total / len(xt):.4f}, held-out accuracy {acc:.4f}")
    model.eval()
    with torch.no_grad():
        ref = model(xe).numpy()
    acc_torch = float((ref.argmax(1) == y_te).mean())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits.onnx"
    torch.onnx.export(model, (xe[:1],), str(onnx_path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
                      do_constant_folding=True)
    npz_path = out / "digits_heldout.npz"
    np.savez_compressed(npz_path, images=x_te, labels=y_te, indices=idx_te.astype(np.int64))

    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(onnx_path), full_check=True)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": xe.numpy()})[0]
    acc_onnx = float((got.argmax(1) == y_te).mean())
    diff = float(np.max(np.abs(got - ref)))
    dt = time.perf_counter() - t0
    print(f"split: sklearn train_test_split(test_size=0.25, random_state=0, stratify=labels): "
          f"{len(y_tr)} train, {len(y_te)} held out")
    print(f"held-out accuracy: torch {acc_torch:.4f}, onnxruntime {acc_onnx:.4f} (max |ort - torch| {diff:.3g})")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} B), {npz_path} ({npz_path.stat().st_size} B) "
          f"in {dt:.1f} s")
    if acc_onnx < 0.95 or acc_onnx != acc_torch:
        raise SystemExit("held-out accuracy below 0.95 or the ONNX file disagrees with torch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
