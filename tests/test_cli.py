"""The CLI through a subprocess: exit codes, reports, and bad input (one
line on stderr, no traceback, no output file, input bytes unchanged)."""

import hashlib
import json
import subprocess
import sys

import onnx
import pytest

from builders import head_model
from helpers import ops, parse


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnx_fc2conv", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "head.onnx"
    onnx.save(head_model(chain=("Relu", "Dropout"), softmax=True), path)
    return path


def test_convert_check_report(model_path, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    before = digest(model_path)
    r = cli("convert", model_path, "-o", out, "--check", "--report", rep)
    assert r.returncode == 0, r.stderr
    assert "2 FC layers, 2 converted in 1 head" in r.stdout
    assert "Conv 3x3, 4 -> 6 channels" in r.stdout and "Conv 1x1, 6 -> 5 channels" in r.stdout
    assert "check (cpu, 3 runs, inputs x [2,4,3,3]): PASSED" in r.stdout
    assert digest(model_path) == before
    converted = onnx.load(out)
    assert "Gemm" not in ops(converted)
    report = json.loads(rep.read_text())
    assert set(report) >= {"input", "output", "conversion", "check", "written"}
    assert report["written"] is True and report["check"]["ok"] is True
    layer = report["conversion"]["layers"][0]
    assert set(layer) >= {"name", "op", "pattern", "input_shape", "layout", "converted", "reason", "kernel",
                          "in_channels", "out_channels", "becomes"}
    assert layer["kernel"] == [3, 3] and layer["layout"] == "NCHW"
    out_rep = report["check"]["outputs"][0]
    assert set(out_rep) >= {"name", "max_abs", "max_rel", "mean_abs", "p99_abs", "min_atol", "passed", "atol", "rtol"}


def test_check_command_passes_and_fails(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    assert cli("convert", model_path, "-o", out).returncode == 0
    r = cli("check", model_path, out, "--report", tmp_path / "c.json")
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr
    other = tmp_path / "other.onnx"
    onnx.save(head_model(chain=("Relu", "Dropout"), softmax=True, seed=7), other)
    r = cli("check", model_path, other)
    assert r.returncode == 1 and "FAILED" in r.stdout
    assert json.loads((tmp_path / "c.json").read_text())["check"]["ok"] is True


def test_convert_check_failure_writes_nothing(model_path, tmp_path, monkeypatch, capsys):
    """A conversion that fails its check is not written: exit 1."""
    from onnx_fc2conv import cli as cli_mod, kernels

    real = kernels.fc_bias
    monkeypatch.setattr(kernels, "fc_bias", lambda c, m, beta=1.0: real(c, m, beta=beta) + 0.5)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli_mod.main(["convert", str(model_path), "-o", str(out), "--check", "--report", str(rep)])
    captured = capsys.readouterr()
    assert code == 1
    assert not out.exists()
    assert "FAILED" in captured.out and "was not written" in captured.err
    report = json.loads(rep.read_text())
    assert report["written"] is False and report["check"]["ok"] is False


def test_inspect_text_and_json(model_path):
    r = cli("inspect", model_path)
    assert r.returncode == 0
    assert "2 FC layers, 2 convertible" in r.stdout and "Flatten" in r.stdout and "NCHW" in r.stdout
    r = cli("inspect", model_path, "--json")
    data = json.loads(r.stdout)
    assert data["fc_layers"] == 2 and data["layers"][0]["pattern"] == "Flatten"


def test_nothing_to_convert(tmp_path):
    path, out = tmp_path / "relu.onnx", tmp_path / "out.onnx"
    onnx.save(parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,2,3,3] y) { y = Relu(x) }"""), path)
    r = cli("convert", path, "-o", out, "--check")
    assert r.returncode == 0, r.stderr
    assert "nothing to convert" in r.stdout and "no FC layer found" in r.stdout
    assert onnx.load(out).graph.node[0].op_type == "Relu"


def test_quiet_prints_nothing(model_path, tmp_path):
    r = cli("convert", model_path, "-o", tmp_path / "o.onnx", "-q", "--check")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_python_m_and_console_script_agree(model_path):
    import shutil
    exe = shutil.which("onnx-fc2conv")
    assert exe, "console script not installed"
    a = subprocess.run([exe, "inspect", str(model_path), "--json"], capture_output=True, text=True)
    assert a.returncode == 0 and a.stdout == cli("inspect", model_path, "--json").stdout


def test_input_shape_onnxsim_spelling(model_path, tmp_path):
    r = cli("convert", model_path, "-o", tmp_path / "o.onnx", "--input-shape", "x:3,4,3,3", "--check")
    assert r.returncode == 0 and "inputs x [3,4,3,3]" in r.stdout, r.stderr


def test_usage_error_is_exit_2():
    r = cli("convert")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_progress_only_on_a_terminal(model_path, tmp_path, monkeypatch, capsys):
    from onnx_fc2conv import cli as cli_mod
    out = tmp_path / "o.onnx"
    assert cli_mod.main(["convert", str(model_path), "-o", str(out), "--check"]) == 0
    assert capsys.readouterr().err == ""  # not a terminal: quiet
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli_mod.main(["convert", str(model_path), "-o", str(out), "--check"]) == 0
    err = capsys.readouterr().err
    assert "loading and converting" in err and "checking on cpu" in err and "writing" in err
    assert cli_mod.main(["convert", str(model_path), "-o", str(out), "--check", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_fold_batch_from_the_cli(model_path, tmp_path):
    r = cli("convert", model_path, "-o", tmp_path / "o.onnx", "--fold-batch", "--check")
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stderr
    assert "Reshape" in ops(onnx.load(tmp_path / "o.onnx"))
    r = cli("convert", model_path, "-o", tmp_path / "d.onnx", "--fold-batch", "--dense")
    assert r.returncode == 2 and "--fold-batch is for keep mode" in r.stderr
