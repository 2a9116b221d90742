"""Export the ONNX fixtures in tests/fixtures/ with REAL exporters (dev only).

The project itself never imports torch, tensorflow or paddle; only this
script does, and it runs in three throw-away virtual environments kept outside
the repo (torch and tensorflow pin conflicting protobuf/numpy versions, and
paddle2onnx pins onnx 1.17.0, so they do not share one).  Versions used for
the committed fixtures (Python 3.11, CPU only):

    # torch side: torch 2.14.1, torchvision 0.29.1, onnx, onnxscript, onnxruntime
    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        onnx onnxscript onnxruntime

    # tensorflow side: tensorflow-cpu 2.21.0 (Keras 3), tf2onnx 1.17.0
    python3 -m venv /work/venvs/tf
    /work/venvs/tf/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 \\
        onnx onnxruntime

    # paddle side: paddlepaddle 3.3.1 (CPU), paddle2onnx 2.1.0 (which pins onnx 1.17.0).
    # paddle2onnx folds constants with Polygraphy and, when onnx_graphsurgeon or
    # sympy is missing, Polygraphy pip-installs it at export time: install them here.
    python3 -m venv /work/venvs/paddle
    /work/venvs/paddle/bin/pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 \\
        onnx_graphsurgeon sympy onnxruntime

The exact resolved versions (onnx, onnxscript, onnxruntime, protobuf, numpy)
are listed in tests/fixtures/README.md.

Run from the repository root:

    /work/venvs/torch/bin/python tools/export_fixtures.py torch   # TorchScript + dynamo fixtures
    /work/venvs/tf/bin/python    tools/export_fixtures.py keras   # tf2onnx fixtures
    /work/venvs/paddle/bin/python tools/export_fixtures.py paddle # paddle2onnx fixture (batch -1)
    python tools/export_fixtures.py describe                      # onnx only: print every fixture's head

``--only NAME`` (repeatable; NAME is the file stem, e.g. ``vgg_narrow_ts``)
exports just those fixtures; ``--out DIR`` writes somewhere else than
tests/fixtures/.  Every export is followed by a check: the file is loaded in
onnxruntime (CPU) and its output compared with the framework's output on a
seeded random input (the max abs diff is printed).  Weights are seeded
(``torch.manual_seed`` / ``keras.utils.set_random_seed`` / ``paddle.seed``), models are in eval
mode, and outputs are overwritten, so reruns are idempotent: the torch files
(TorchScript and dynamo) come out byte-identical; the tf2onnx files differ
between runs only in a few generated node/initializer names (e.g.
``Transpose__34`` vs ``Transpose__36``), not in structure or weights; the
paddle file comes out byte-identical.  (The dynamo files record this script's
line numbers in their metadata, so an edit above a model class changes those
bytes on re-export, not the graph or the weights.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures"
SEED = 0


# ---------------------------------------------------------------- common ---

def _ort_run(path: Path, feed: dict) -> list:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _check(path: Path, feed: dict, ref: np.ndarray, tol: float) -> float:
    out = _ort_run(path, feed)[0]
    if out.shape != ref.shape:
        raise SystemExit(f"{path.name}: onnxruntime shape {out.shape} != framework shape {ref.shape}")
    diff = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    extra = f" + {data.name} {data.stat().st_size} B" if data.exists() else ""
    status = "ok" if diff <= tol else "MISMATCH"
    print(f"{path.name:34s} {size:9d} B{extra}  in {list(feed.values())[0].shape} "
          f"{list(feed.values())[0].dtype}  max|ort-ref| = {diff:.3g}  [{status}]")
    if diff > tol:
        raise SystemExit(f"{path.name}: max abs diff {diff} > {tol}")
    return diff


def _wanted(name: str, only: list[str] | None) -> bool:
    return not only or name in only


# ----------------------------------------------------------------- torch ---

def _torch_nets():
    import torch
    from torch import nn

    class AlexNetNarrow(nn.Module):
        """AlexNet-shaped trunk at 3x63x63 -> [16,6,6] -> AdaptiveAvgPool (3,3)."""

        def __init__(self, num_classes: int = 10, view: bool = False):
            super().__init__()
            self.view = view
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, kernel_size=5, stride=2, padding=2), nn.ReLU(inplace=True),   # 32
                nn.MaxPool2d(kernel_size=3, stride=2),                                        # 15
                nn.Conv2d(8, 16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),                                        # 7
                nn.Conv2d(16, 16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(16, 16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, stride=1),                                        # 6
            )
            self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
            self.classifier = nn.Sequential(
                nn.Dropout(p=0.5), nn.Linear(16 * 3 * 3, 64), nn.ReLU(inplace=True),
                nn.Dropout(p=0.5), nn.Linear(64, 64), nn.ReLU(inplace=True),
                nn.Linear(64, num_classes),
            )

        def forward(self, x):
            x = self.avgpool(self.features(x))
            x = x.view(x.size(0), -1) if self.view else torch.flatten(x, 1)
            return self.classifier(x)

    class VGGNarrow(nn.Module):
        """Three VGG blocks (8, 16, 16 channels) at 3x32x32 -> [16,4,4] -> flatten."""

        def __init__(self, num_classes: int = 10):
            super().__init__()

            def block(cin, cout, n):
                layers = []
                for i in range(n):
                    layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
                return layers + [nn.MaxPool2d(2, 2)]

            self.features = nn.Sequential(*block(3, 8, 2), *block(8, 16, 2), *block(16, 16, 1))
            self.classifier = nn.Sequential(
                nn.Linear(16 * 4 * 4, 64), nn.ReLU(True), nn.Dropout(),
                nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
                nn.Linear(64, num_classes),
            )

        def forward(self, x):
            x = self.features(x)
            x = torch.flatten(x, 1)
            return self.classifier(x)

    class Conv1dNet(nn.Module):
        """[N,4,64] -> two Conv1d blocks -> [N,16,16] -> flatten -> Linear -> ReLU -> Linear."""

        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            )
            self.fc1 = nn.Linear(16 * 16, 32)
            self.fc2 = nn.Linear(32, num_classes)

        def forward(self, x):
            x = torch.flatten(self.features(x), 1)
            return self.fc2(torch.relu(self.fc1(x)))

    return AlexNetNarrow, VGGNarrow, Conv1dNet


def _tiny_efficientnet(num_classes: int = 10):
    """torchvision's EfficientNet with a four-stage MBConv setting (stem 16 ch at 3x64x64).

    Every MBConv has torchvision's squeeze-excitation (AdaptiveAvgPool2d(1) ->
    1x1 Conv -> SiLU -> 1x1 Conv -> Sigmoid -> Mul); the head is Conv 1x1 (64 ->
    256) -> BN -> SiLU -> AdaptiveAvgPool2d(1) -> flatten -> Dropout -> Linear.
    Trunk stride 16: [256, 4, 4] before the head's pool.
    """
    from torchvision.models import EfficientNet
    from torchvision.models.efficientnet import MBConvConfig

    setting = [
        # expand, kernel, stride, in, out, layers
        MBConvConfig(1, 3, 1, 16, 16, 1),    # no expand conv (ratio 1), like B0's first stage
        MBConvConfig(4, 3, 2, 16, 24, 2),
        MBConvConfig(4, 5, 2, 24, 40, 1),
        MBConvConfig(4, 3, 2, 40, 64, 1),
    ]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=num_classes)


def _randomize_bn(model) -> None:
    """Give BatchNorm layers non-trivial running stats so folding is visible."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def export_torch(out: Path, only: list[str] | None) -> None:
    import torch
    import torchvision

    AlexNetNarrow, VGGNarrow, Conv1dNet = _torch_nets()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    dyn_b = {"input": {0: "batch"}, "output": {0: "batch"}}

    def make(ctor, *args, **kw):
        torch.manual_seed(SEED)
        m = ctor(*args, **kw)
        _randomize_bn(m)
        return m.eval()

    def sample(shape, dtype=torch.float32):
        g = torch.Generator().manual_seed(SEED + 2)
        return torch.randn(*shape, generator=g).to(dtype)

    def ts(name, model, x, opset=17, dynamic_axes=None, tol=1e-4, fp32_model=None):
        """TorchScript (legacy tracing) exporter."""
        if not _wanted(name, only):
            return
        path = out / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        # check on batch 2 when the batch is dynamic
        xb = torch.cat([x, sample(x.shape, x.dtype) * 0.5]) if dynamic_axes else x
        with torch.no_grad():
            ref = model(xb).float().numpy()
        _check(path, {"input": xb.numpy()}, ref, tol)
        if fp32_model is not None:   # half-precision export: also against the fp32 net
            with torch.no_grad():
                ref32 = fp32_model(xb.float()).numpy()
            out16 = _ort_run(path, {"input": xb.numpy()})[0].astype(np.float64)
            print(f"{'':34s} vs the fp32 torch model: max|ort-ref32| = {np.max(np.abs(out16 - ref32)):.3g}"
                  f"  (max|ref32| = {np.max(np.abs(ref32)):.3g})")

    def dynamo(name, model, x, dynamic=True, external_data=True, tol=1e-4):
        """torch.export-based (dynamo) exporter; default opset of this torch."""
        if not _wanted(name, only):
            return
        path = out / f"{name}.onnx"
        data = path.with_name(path.name + ".data")
        for p in (path, data):
            if p.exists():
                p.unlink()
        kw = {}
        if dynamic:
            kw["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"],
                              output_names=["output"], external_data=external_data, **kw)
        xb = torch.cat([x, sample(x.shape) * 0.5]) if dynamic else x
        with torch.no_grad():
            ref = model(xb).numpy()
        _check(path, {"input": xb.numpy()}, ref, tol)

    # ---- TorchScript exporter -------------------------------------------
    x63 = sample((1, 3, 63, 63))
    x32 = sample((1, 3, 32, 32))
    x64 = sample((1, 3, 64, 64))
    alex = make(AlexNetNarrow)
    alex_view = make(AlexNetNarrow, view=True)
    vgg = make(VGGNarrow)

    ts("alexnet_narrow_ts", alex, x63)
    ts("alexnet_view_dynbatch_ts", alex_view, x63, dynamic_axes=dyn_b)
    ts("vgg_narrow_dynbatch_op13_ts", vgg, x32, opset=13, dynamic_axes=dyn_b)
    ts("conv1d_net_dynbatch_ts", make(Conv1dNet), sample((1, 4, 64)), dynamic_axes=dyn_b)

    # float16: the whole module in half precision, traced on CPU.
    # (CPU half Conv/Linear work in this torch; the reference is the same half module.)
    ts("vgg_narrow_fp16_ts", make(VGGNarrow).half(), x32.half(), opset=17, tol=1e-2, fp32_model=vgg)

    tv = torchvision.models
    ts("shufflenet_v2_x0_5_ts", make(tv.shufflenet_v2_x0_5, num_classes=10), x64)
    ts("mnasnet0_5_dynbatch_ts", make(tv.mnasnet0_5, num_classes=10), x64, dynamic_axes=dyn_b)
    # full-width mobilenet_v3_small with 10 classes is ~6 MB; width 0.5 keeps the
    # Linear -> Hardswish -> Dropout -> Linear head with 288 -> 512 -> 10.
    ts("mobilenet_v3_small_w05_ts", make(tv.mobilenet_v3_small, num_classes=10, width_mult=0.5), x64)
    # opset 9: the channel shuffles' view/transpose/view and Split with a `split`
    # attribute; dense mode's rewritten Reshapes take their shape from Shape(x),
    # and opset-9 shape inference then loses the rank downstream (issue 10).
    ts("shufflenet_v2_x0_5_op9_ts", make(tv.shufflenet_v2_x0_5, num_classes=10), x64, opset=9)
    # squeeze-excitation in every block: global pools inside the trunk (issue 12)
    ts("efficientnet_style_se_ts", make(_tiny_efficientnet, num_classes=10), x64)

    # ---- dynamo exporter ------------------------------------------------
    dynamo("alexnet_narrow_dynamo", alex, x63, external_data=True)
    dynamo("vgg_narrow_dynamo", vgg, x32, external_data=False)
    dynamo("shufflenet_v2_x0_5_dynamo", make(tv.shufflenet_v2_x0_5, num_classes=10), x64,
           external_data=False)

    export_torch_heads(out / HEADS, only)


# ----------------------------------------------------------------- keras ---

def export_keras(out: Path, only: list[str] | None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx
    import keras
    from keras import layers

    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, tf2onnx {tf2onnx.__version__}")

    # Keras zero-initialises Dense/Conv biases, and tf2onnx then drops the Add of an
    # all-zero bias (MatMul with no Add); random biases keep the MatMul -> Add pair.
    def dense(units, **kw):
        return layers.Dense(units, bias_initializer=keras.initializers.RandomNormal(stddev=0.1), **kw)

    def trunk(inp):
        x = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
        return layers.MaxPooling2D(2)(x)                                   # 8x8x16

    def flatten_dense():
        inp = keras.Input((32, 32, 3), name="input")
        x = layers.Flatten()(trunk(inp))
        x = dense(32, activation="relu")(x)
        return keras.Model(inp, dense(10, activation="softmax")(x))

    def gap_dense():
        inp = keras.Input((32, 32, 3), name="input")
        x = layers.GlobalAveragePooling2D()(trunk(inp))
        return keras.Model(inp, dense(10)(x))

    def flatten_bn_dropout():
        inp = keras.Input((32, 32, 3), name="input")
        x = layers.Flatten()(trunk(inp))
        x = dense(32)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.Dropout(0.5)(x)
        return keras.Model(inp, dense(10)(x))

    def randomize_bn(model):
        rng = np.random.default_rng(SEED + 1)
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                n = layer.gamma.shape[0]
                layer.set_weights([
                    (rng.random(n) + 0.5).astype("float32"), (rng.standard_normal(n) * 0.1).astype("float32"),
                    (rng.standard_normal(n) * 0.1).astype("float32"), (rng.random(n) + 0.5).astype("float32"),
                ])

    for name, build in (("keras_flatten_dense_tf2onnx", flatten_dense),
                        ("keras_gap_dense_tf2onnx", gap_dense),
                        ("keras_flatten_bn_dropout_tf2onnx", flatten_bn_dropout)):
        if not _wanted(name, only):
            continue
        keras.utils.set_random_seed(SEED)
        model = build()
        randomize_bn(model)
        spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input"),)

        @tf.function(input_signature=spec)
        def fn(x):
            return model(x, training=False)

        path = out / f"{name}.onnx"
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=13, output_path=str(path))
        xb = np.random.default_rng(SEED + 2).standard_normal((2, 32, 32, 3)).astype("float32")
        ref = model(xb, training=False).numpy()
        _check(path, {"input": xb}, ref, 1e-4)

    export_keras_heads(out / HEADS, only)


# ---------------------------------------------------------------- paddle ---

def export_paddle(out: Path, only: list[str] | None) -> None:
    """paddle2onnx export of a tiny VGG, then its batch dim written as the number -1.

    paddle2onnx 2.1.0 names a free dim ``DynamicDimension.N`` (dim_param); the
    ``-1`` that paddle2onnx-exported files in the wild carry as a dim_value
    (onnx.checker accepts it, onnxruntime treats it as dynamic) is written
    afterwards wherever the batch's dim_param stood (graph input, output, and
    the value_info that Polygraphy's folding added), the only edit.
    Everything else is paddle2onnx's own output, after its default Polygraphy
    constant folding.
    """
    import tempfile

    import onnx
    import paddle
    import paddle2onnx
    from paddle import nn

    print(f"paddlepaddle {paddle.__version__}, paddle2onnx {paddle2onnx.__version__}, onnx {onnx.__version__}")
    name = "vgg_tiny_paddle"
    if not _wanted(name, only):
        return

    class VGGTiny(nn.Layer):
        """Three conv/pool blocks (8, 16, 16 channels) at 3x32x32 -> [16,4,4] -> Flatten -> 2 Linear."""

        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2, 2),
                nn.Conv2D(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2, 2),
                nn.Conv2D(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2, 2),
            )
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(16 * 4 * 4, 64)
            self.fc2 = nn.Linear(64, num_classes)

        def forward(self, x):
            x = self.flatten(self.features(x))
            return self.fc2(nn.functional.relu(self.fc1(x)))

    paddle.seed(SEED)
    model = VGGTiny()
    model.eval()
    spec = [paddle.static.InputSpec([-1, 3, 32, 32], "float32", "x")]
    with tempfile.TemporaryDirectory() as tmp:
        paddle.onnx.export(model, os.path.join(tmp, name), input_spec=spec, opset_version=11)
        m = onnx.load(os.path.join(tmp, name + ".onnx"))
    batch = m.graph.input[0].type.tensor_type.shape.dim[0].dim_param    # "DynamicDimension.0"
    assert batch, "paddle2onnx should name the free batch"
    for vi in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param == batch or (vi is m.graph.output[0] and dim is vi.type.tensor_type.shape.dim[0]):
                dim.Clear()
                dim.dim_value = -1
    path = out / f"{name}.onnx"
    onnx.save(m, str(path))
    onnx.checker.check_model(str(path))
    xb = np.random.default_rng(SEED + 2).standard_normal((2, 3, 32, 32)).astype("float32")
    with paddle.no_grad():
        ref = model(paddle.to_tensor(xb)).numpy()
    _check(path, {"x": xb}, ref, 1e-4)


# ------------------------------------------------------- heads (issue 13) ---
#
# Small nets with the classifier heads today's model zoos use, written into
# tests/fixtures/heads/ (its README.md tables them).  `torch` and `keras` export
# them after the fixtures above; `--only NAME` picks them like any other.
# timm (dev only: `/work/venvs/torch/bin/pip install timm`, 1.0.31 used) gives
# the real ConvNeXt / MobileNetV3 classes and timm's ClassifierHead, built with
# tiny stage settings and random weights (nothing is downloaded).

HEADS = "heads"


def _randomize_heads(model, shape) -> None:
    """Seeded non-trivial weights: torch's default init for every Conv/Linear
    (timm's init leaves biases at zero and ConvNeXt's weights at std 0.02),
    random LayerNorm/BatchNorm affine parameters, and BatchNorm running
    statistics measured on seeded random batches (train-mode forwards), so the
    activations neither vanish nor blow up and the output depends on the input."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED + 3)
    bns = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.reset_parameters()
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                bns.append((m, m.momentum))
                m.reset_running_stats()
                m.momentum = None          # cumulative average over the batches below
    if bns:
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(16, *shape[1:], generator=g))
        for m, momentum in bns:
            m.momentum = momentum
    model.eval()


def _head_nets():
    import torch
    from torch import nn
    from timm.layers import ClassifierHead

    class PoolHeadNet(nn.Module):
        """Conv-BN-ReLU x3 (8, 16, 32 ch, stride 8; no squeeze-excitation) at 3x32x40 -> [32,4,5],
        then timm's ClassifierHead(pool_type=...): SelectAdaptivePool2d(flatten) -> Linear."""

        def __init__(self, pool_type: str, num_classes: int = 10):
            super().__init__()

            def cbr(cin, cout):
                return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

            self.features = nn.Sequential(*cbr(3, 8), *cbr(8, 16), *cbr(16, 32))
            self.head = ClassifierHead(32, num_classes, pool_type=pool_type)

        def forward(self, x):
            return self.head(self.features(x))

    class MlpLn1d(nn.Module):
        """Keyword-spotting style: [N,16,64] (16 bands x 64 frames) -> Conv1d-BN-ReLU-MaxPool x2
        -> [N,16,16] -> flatten -> Linear 256->64 -> LayerNorm(64) -> ReLU -> Linear 64->10."""

        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
                nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            )
            self.fc1 = nn.Linear(16 * 16, 64)
            self.norm = nn.LayerNorm(64)
            self.fc2 = nn.Linear(64, num_classes)

        def forward(self, x):
            x = torch.flatten(self.features(x), 1)
            return self.fc2(torch.relu(self.norm(self.fc1(x))))

    return PoolHeadNet, MlpLn1d


def _timm_convnext(num_classes: int = 10):
    """timm's ConvNeXt class (4 stages, depths 1-1-0-0, dims 8-16-24-32): patch stem Conv 4x4/4 ->
    LayerNorm2d, one ConvNeXt block in each of the first two stages (dw Conv 7x7 -> permute to NHWC ->
    LayerNorm -> Linear C->4C -> GELU -> Linear 4C->C -> permute back -> layer scale Mul -> residual
    Add), downsamples LayerNorm2d -> Conv 2x2/2; trunk stride 32, [32,2,3] at 3x64x96.  Head
    (NormMlpClassifierHead): SelectAdaptivePool2d(avg) -> LayerNorm2d on [N,32,1,1] -> Flatten -> Linear."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(num_classes=num_classes, depths=(1, 1, 0, 0), dims=(8, 16, 24, 32), ls_init_value=0.5)


def _timm_mobilenetv3(num_classes: int = 10):
    """timm's MobileNetV3 class with a 4-block arch_def and no squeeze-excitation: stem Conv 3x3/2
    (16) -> DS 3x3/2 (16) -> IR k3/2 e3 (24, ReLU) -> IR k5/2 e3 (32) -> ConvBnAct 1x1 (64); trunk
    stride 16, [64,4,5] at 3x64x80.  MobileNetV3's 'efficient head': SelectAdaptivePool2d(avg) ->
    conv_head 1x1 64->128 (bias) -> Hardswish -> Flatten -> Linear 128->10.  (timm's head_norm=True,
    the MobileNetV4-conv head with a BatchNorm after conv_head, exports to the same graph: both
    exporters fold that BatchNorm into conv_head in eval mode.)"""
    from torch import nn
    from timm.layers import get_act_layer
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [["ds_r1_k3_s2_e1_c16"], ["ir_r1_k3_s2_e3_c24_nre"], ["ir_r1_k5_s2_e3_c32"], ["cn_r1_k1_s1_c64"]]
    return MobileNetV3(decode_arch_def(arch), num_classes=num_classes, stem_size=16, num_features=128,
                       act_layer=get_act_layer("hard_swish"), norm_layer=nn.BatchNorm2d)


def export_torch_heads(out: Path, only: list[str] | None) -> None:
    """Each head with the TorchScript exporter (opset 17, batch 1) and the dynamo
    exporter (its default opset, dynamic batch, weights inside the file)."""
    import torch

    try:
        import timm
    except ImportError:
        raise SystemExit("the head fixtures need timm in this venv: pip install timm (1.0.31 used)") from None

    print(f"heads: timm {timm.__version__} -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    PoolHeadNet, MlpLn1d = _head_nets()

    def sample(shape):
        g = torch.Generator().manual_seed(SEED + 2)
        return torch.randn(*shape, generator=g)

    def both(pattern, build, shape, tol=1e-4):
        names = (f"{pattern}_ts", f"{pattern}_dynamo")
        if not any(_wanted(n, only) for n in names):
            return
        torch.manual_seed(SEED)
        model = build()
        _randomize_heads(model, shape)
        x = sample(shape)
        if _wanted(names[0], only):
            path = out / f"{names[0]}.onnx"
            with torch.no_grad():
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["output"], do_constant_folding=True)
                ref = model(x).numpy()
            _check(path, {"input": x.numpy()}, ref, tol)
        if _wanted(names[1], only):
            path = out / f"{names[1]}.onnx"
            for p in (path, path.with_name(path.name + ".data")):
                if p.exists():
                    p.unlink()
            # traced on batch 2: a batch-1 example lets torch.export specialise the batch
            xb = torch.cat([x, sample(shape) * 0.5])
            batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
            with torch.no_grad():
                torch.onnx.export(model, (xb,), str(path), dynamo=True, input_names=["input"],
                                  output_names=["output"], external_data=False, dynamic_shapes=batch)
                ref = model(xb).numpy()
            _check(path, {"input": xb.numpy()}, ref, tol)

    # non-square inputs: the maps before the pools are 2x3, 4x5, 4x5, so a swapped H/W shows
    both("convnext_head", _timm_convnext, (1, 3, 64, 96))
    both("conv_head", _timm_mobilenetv3, (1, 3, 64, 80))
    both("avgmax", lambda: PoolHeadNet("avgmax"), (1, 3, 32, 40))
    both("catavgmax", lambda: PoolHeadNet("catavgmax"), (1, 3, 32, 40))
    both("mlp_ln_1d", MlpLn1d, (1, 16, 64))


def export_keras_heads(out: Path, only: list[str] | None) -> None:
    """Keras (channels-last) Conv2D -> GlobalAveragePooling2D -> Dense through tf2onnx at opset 18.

    At opset 18 tf2onnx keeps the Keras global mean as ReduceMean(axes input [1,2],
    keepdims=0) on the NHWC map behind a Transpose(0,2,3,1) (its transpose optimizer
    does not push a Transpose through a keepdims=0 ReduceMean from opset 18 on; at
    opset 13 the same model comes out as GlobalAveragePool -> Squeeze).

    ``keras_nhwc_gap_cast_tf2onnx``: the Dense is CastDense below, whose call wraps
    its input and its MatMul output in ``tf.cast(tf.cast(v, tf.float64), tf.float32)``
    (exact: float32 -> float64 -> float32 round-trips every value); tf2onnx merges
    each pair into one Cast(to=FLOAT) on a float tensor, i.e. a no-op Cast between
    the ReduceMean and the MatMul and another between the MatMul and its Add.
    ``keras_nhwc_gap_tf2onnx``: the same with a plain Dense (no Cast).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx
    import keras
    from keras import layers

    out.mkdir(parents=True, exist_ok=True)

    def bias_init():   # random biases keep tf2onnx's MatMul -> Add pair (see export_keras)
        return keras.initializers.RandomNormal(stddev=0.1, seed=SEED + 1)

    class CastDense(layers.Layer):
        def __init__(self, units, **kw):
            super().__init__(**kw)
            self.units = units

        def build(self, shape):
            self.kernel = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform")
            self.bias = self.add_weight(shape=(self.units,), initializer=bias_init())

        def call(self, x):
            x = tf.cast(tf.cast(x, tf.float64), tf.float32)
            y = tf.matmul(x, self.kernel)
            y = tf.cast(tf.cast(y, tf.float64), tf.float32)
            return y + self.bias

    def build(head):
        # a non-square input and C != H != W, so that a mixed-up axis shows
        inp = keras.Input((32, 40, 3), name="input")
        x = layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu")(x)      # 8x10x12
        x = layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, head(x))

    for name, head in (("keras_nhwc_gap_cast_tf2onnx", lambda: CastDense(10)),
                       ("keras_nhwc_gap_tf2onnx", lambda: layers.Dense(10, bias_initializer=bias_init()))):
        if not _wanted(name, only):
            continue
        keras.utils.set_random_seed(SEED)
        model = build(head())
        spec = (tf.TensorSpec((None, 32, 40, 3), tf.float32, name="input"),)

        @tf.function(input_signature=spec)
        def fn(x):
            return model(x, training=False)

        path = out / f"{name}.onnx"
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=18, output_path=str(path))
        xb = np.random.default_rng(SEED + 2).standard_normal((2, 32, 40, 3)).astype("float32")
        ref = model(xb, training=False).numpy()
        _check(path, {"input": xb}, ref, 1e-4)


# -------------------------------------------------------------- describe ---

def describe(out: Path, only: list[str] | None) -> None:
    """Print what a pattern matcher sees in each fixture (needs only onnx)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    for path in sorted(out.glob("*.onnx")):
        if not _wanted(path.stem, only):
            continue
        m = onnx.load(str(path))   # also loads NAME.onnx.data (relative location)
        raw = onnx.load(str(path), load_external_data=False)
        ext = [t.name for t in raw.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        locs = sorted({e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"})
        g = m.graph
        print(f"\n=== {path.name}  ir={m.ir_version}  opsets="
              f"{[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}  "
              f"producer={m.producer_name} {m.producer_version}")

        def dims(vi):
            t = vi.type.tensor_type
            return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                    for d in t.shape.dim], onnx.TensorProto.DataType.Name(t.elem_type)

        for vi in g.input:
            print("  input ", vi.name, *dims(vi))
        for vi in g.output:
            print("  output", vi.name, *dims(vi))
        print(f"  initializers={len(g.initializer)} (external={len(ext)} {locs})  value_info={len(g.value_info)}  "
              f"nodes={len(g.node)}  functions={len(m.functions)}")
        ops: dict[str, int] = {}
        for n in g.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        print("  ops:", ops)

        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        consts = {}
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        consts[n.output[0]] = numpy_helper.to_array(a.t)
        producer = {o: n for n in g.node for o in n.output}

        def const_of(name):
            if name in inits:
                return inits[name], "init"
            if name in consts:
                return consts[name], "Constant"
            n = producer.get(name)
            if n is not None and n.op_type == "Identity" and n.input[0] in inits:
                return inits[n.input[0]], "Identity(init)"
            return None, None

        def fmt(name):
            v, where = const_of(name)
            if v is None:
                return name
            if v.size <= 8:
                return f"{where}:{v.dtype}{v.tolist()}"
            return f"{where}:{v.dtype}{list(v.shape)}"

        try:
            inf = shape_inference.infer_shapes(m, data_prop=True)
            shapes = {vi.name: dims(vi)[0] for vi in list(inf.graph.value_info) + list(inf.graph.input)
                      + list(inf.graph.output)}
        except Exception as e:  # pragma: no cover
            print("  shape inference failed:", e)
            shapes = {}

        # FCs: Gemm, or MatMul with a constant 2-D operand
        fc = [n for n in g.node if n.op_type == "Gemm"
              or (n.op_type == "MatMul" and any(const_of(i)[0] is not None and const_of(i)[0].ndim == 2
                                                for i in n.input))]
        print(f"  FC nodes: {len(fc)}  first FC input {fc[0].input[0] if fc else None} "
              f"shape {shapes.get(fc[0].input[0]) if fc else None}")
        # head = from the last spatial op (Conv / pooling) to the end
        spatial = ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
        last = max(i for i, n in enumerate(g.node) if n.op_type in spatial)
        print(f"  head (from node {last}):")
        for n in g.node[last:]:
            attrs = []
            for a in n.attribute:
                v = onnx.helper.get_attribute_value(a)
                if isinstance(v, onnx.TensorProto):
                    v = numpy_helper.to_array(v)
                    v = v.tolist() if v.size <= 8 else f"{v.dtype}{list(v.shape)}"
                elif isinstance(v, bytes):
                    v = v.decode()
                attrs.append(f"{a.name}={v}")
            ins = ", ".join(fmt(i) for i in n.input)
            outs = ", ".join(f"{o}{shapes.get(o, '')}" for o in n.output)
            print(f"    {n.op_type}({ins}) {' '.join(attrs)} -> {outs}   [{n.name}]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["torch", "keras", "paddle", "describe"])
    ap.add_argument("--only", action="append", metavar="NAME", help="fixture stem; repeatable")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"torch": export_torch, "keras": export_keras, "paddle": export_paddle,
     "describe": describe}[args.what](args.out, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
