"""The dense check's translation-equivariance test (check/dense.py): the DENSE
model on ``x[s:]`` equals it on ``x[:-s]`` moved by one position, wherever
both windows lie inside the image. The window and crop comparisons run the
original's trunk, which a dense model shares, so only this test can see a
trunk op that mixes positions. The dense models of mixing trunks below are
built by hand, bypassing any refusal, and must FAIL on exactly that line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import parse
from onnx_fc2conv import check, convert
from onnx_fc2conv.check import dense as dense_check
from onnx_fc2conv import dense as dense_mod

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# Fixtures refused in dense mode (squeeze-excitation: global pools in the trunk).
NOT_DENSE = {name for name, expected in __import__("test_fixtures").EXPECTED.items() if expected[4] is not None}

# The op between the trunk's Conv and its Relu: c -> m.
MIXING = {
    # default axes [0, 2, 3]: normalised over the whole image (opset 12: onnx
    # 1.23's shape inference leaves MVN-13's output shape unknown, and then no
    # FC is found)
    "MeanVarianceNormalization": (12, "m = MeanVarianceNormalization(c)"),
    # below opset 13 Softmax flattens C*H*W after its axis
    "Softmax-11 axis=1": (11, "m = Softmax <axis=1> (c)"),
}
NOT_MIXING = "m = Identity(c)"


def pair(op_line: str, opset: int = 13):
    """An original classifier x [1,2,12,12] -> Conv 3x3 pad 1 -> op -> Relu
    -> MaxPool 2 s2 -> Flatten -> Gemm 108->4, and its dense model made by
    hand: the same trunk with symbolic H, W and the Gemm as a Conv 6x6."""
    rng = np.random.default_rng(0)  # the same weights whichever tests run
    cw, cb, fw, fb = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in [(3, 2, 3, 3), (3,), (4, 108), (4,)])
    trunk = f"""
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, cw, cb)
          {op_line}
          r = Relu(m)
          p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)"""
    header = f'<ir_version: 8, opset_import: ["" : {opset}]>'
    original = parse(f"""
        {header}
        g (float[1,2,12,12] x) => (float[1,4] y) {{ {trunk}
          f = Flatten(p)
          y = Gemm <transB=1> (f, fw, fb)
        }}""", cw=cw, cb=cb, fw=fw, fb=fb)
    dense = parse(f"""
        {header}
        g (float[1,2,height,width] x) => (float[1,4,oh,ow] y) {{ {trunk}
          y = Conv <kernel_shape=[6,6]> (p, fk, fb)
        }}""", cw=cw, cb=cb, fk=fw.reshape(4, 3, 6, 6), fb=fb)
    return original, dense


def shift_lines(report):
    return [o for o in report.outputs if "@shift" in o.name]


def assert_shift_passes(report, axes):
    assert report, "\n".join(report.lines())
    shifts = shift_lines(report)
    assert sorted(int(o.name.split("@shift axis ")[1].split()[0]) for o in shifts) == sorted(axes), report.lines()
    for o in shifts:
        n = int(o.name.split("(")[1].split()[0])
        assert o.passed and n >= 2, o.line()


def test_non_mixing_trunk_passes():
    """The control for the failing tests: the same builder without the mixing op."""
    original, dense = pair(NOT_MIXING)
    report = check(original, dense, dense=True)
    assert_shift_passes(report, [2, 3])
    assert not report.notes


@pytest.mark.parametrize("name", list(MIXING))
def test_mixing_trunk_fails_on_the_shift_line(name):
    opset, line = MIXING[name]
    original, dense = pair(line, opset)
    report = check(original, dense, dense=True)
    assert not report, "\n".join(report.lines())
    failed = [o.name for o in report.outputs if not o.passed]
    assert failed and all("@shift" in f for f in failed), report.lines()
    assert {f.split(" by ")[0] for f in failed} == {"y @shift axis 2", "y @shift axis 3"}
    # the head is right: the comparisons against the original's trunk pass
    assert any("windows" in o.name and o.passed for o in report.outputs)
    assert any("@native" in o.name and o.passed for o in report.outputs)
    assert not report.errors


def test_a_mix_along_one_axis_fails_on_that_axis_only():
    """LpNormalization's default axis is -1: it normalises each row along W."""
    original, dense = pair("m = LpNormalization(c)")
    report = check(original, dense, dense=True)
    assert not report
    status = {o.name.split(" by ")[0]: o.passed for o in shift_lines(report)}
    assert status == {"y @shift axis 2": True, "y @shift axis 3": False}, report.lines()


def test_cli_check_exits_1_on_a_mixing_trunk(tmp_path):
    original, dense = pair(MIXING["MeanVarianceNormalization"][1], MIXING["MeanVarianceNormalization"][0])
    onnx.save(original, tmp_path / "orig.onnx")
    onnx.save(dense, tmp_path / "dense.onnx")
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "check", "--dense", tmp_path / "orig.onnx",
                        tmp_path / "dense.onnx"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("FAILED")]
    assert len(failed) == 2 and all(" @shift axis " in ln for ln in failed), r.stdout
    assert r.stdout.startswith("check dense (cpu,") and ": FAILED" in r.stdout.splitlines()[0]


def test_every_dense_sample_and_fixture_passes():
    paths = sorted(ROOT.glob("models/*.onnx")) + sorted(p for p in FIXTURES.glob("*.onnx") if p.name not in NOT_DENSE)
    assert len(paths) >= 15
    for path in paths:
        result = convert(path, dense=True)
        report = check(path, result.model, dense=True)
        axes = [a["input_axis"] for g in result.geometry for a in g["axes"]]
        assert_shift_passes(report, axes)
        assert not report.notes, (path.name, report.notes)


def test_no_interior_position_is_said_not_counted(monkeypatch):
    """vgg_small (receptive field 60, offset -14, stride 8) at native + 1 stride:
    no position is inside the image; the report says so and still passes on
    the rest."""
    monkeypatch.setattr(dense_check, "MAX_SHIFT_FACTOR", 1)
    monkeypatch.setattr(dense_check, "MAX_SHIFT_STEPS", 1)
    path = ROOT / "models" / "vgg_small.onnx"
    report = check(path, convert(path, dense=True).model, dense=True)
    assert report and not shift_lines(report)
    assert len(report.notes) == 2 and all("SKIPPED  prob @shift axis" in n and "not tested" in n
                                          for n in report.notes), report.notes
    assert report.to_dict()["notes"] == report.notes
    assert report.lines()[-2:] == ["  " + n for n in report.notes]


def test_kept_global_pools_skip_with_their_names(monkeypatch):
    """A plan that keeps global pools global (--keep-global-pools): the
    equivariance test does not apply and the report names those ops."""
    real = dense_mod.analyse

    def keeping(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.kept_global = ["pool1"]
        return plan

    monkeypatch.setattr(dense_mod, "analyse", keeping)
    path = ROOT / "models" / "lenet.onnx"
    report = check(path, convert(path, dense=True).model, dense=True)
    assert report and not shift_lines(report)
    assert report.notes == ["SKIPPED  translation equivariance: does not apply, the trunk keeps MaxPool 'pool1' "
                            "global over the whole input (--keep-global-pools), so every position depends on "
                            "the whole image by design"]


def test_the_check_asks_for_a_lenient_plan(monkeypatch):
    """Where dense.analyse can plan without refusing trunk ops (lenient=True),
    the check asks for it: a dense model must be checkable (and fail) even
    when its trunk would be refused for conversion."""
    real, asked = dense_mod.analyse, []

    def analyse(model, infos, heads, layers, overrides, lenient=False):
        asked.append(lenient)
        return real(model, infos, heads, layers, overrides)

    monkeypatch.setattr(dense_mod, "analyse", analyse)
    original, dense = pair(NOT_MIXING)
    assert check(original, dense, dense=True)
    assert asked == [True]
