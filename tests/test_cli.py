"""The CLI through a subprocess: exit codes, reports, and bad input (one
line on stderr, no traceback, no output file, input bytes unchanged)."""

import hashlib
import json
import subprocess
import sys

import numpy as np
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


# -- bad input: exit 2, one line, no traceback, nothing written ---------------

def _bad_files(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(head_model(), good)
    data = good.read_bytes()
    files = {
        "missing": tmp_path / "missing.onnx",
        "directory": tmp_path,
        "empty": tmp_path / "empty.onnx",
        "not_onnx": tmp_path / "notes.onnx",
        "truncated": tmp_path / "truncated.onnx",
        "checker": tmp_path / "checker.onnx",
        "k_mismatch": tmp_path / "k.onnx",
    }
    files["empty"].write_bytes(b"")
    files["not_onnx"].write_text("this is not a model\n" * 20)
    files["truncated"].write_bytes(data[: len(data) // 2])
    bad = head_model()
    bad.graph.node[0].input[1] = "no_such_tensor"
    onnx.save(bad, files["checker"])
    k = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,4] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
        }""", w=np.ones((4, 20), np.float32))
    onnx.save(k, files["k_mismatch"])
    return files


BAD = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "the file is empty",
    "not_onnx": "not an ONNX model",
    "truncated": "not an ONNX model",
    "checker": "fails onnx.checker",
    "k_mismatch": "K=20",
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_bad_input_files(tmp_path, case, command):
    path = _bad_files(tmp_path)[case]
    before = digest(path) if path.is_file() else None
    out = tmp_path / "out.onnx"
    args = ["convert", path, "-o", out, "--check"] if command == "convert" else ["inspect", path]
    r = cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert BAD[case] in lines[0]
    assert str(path.name) in lines[0] or case == "k_mismatch"
    assert not out.exists()
    if before:
        assert digest(path) == before
    assert not list(tmp_path.glob(".out.onnx.*"))


@pytest.mark.parametrize("spec,message", [
    ("x=1,a,3", "does not parse"),
    ("nope=1,4,3,3", "not an input of the model"),
    ("x=1,4,3", "has rank 3, but input 'x' has rank 4"),
    ("x=1,4,5,5", "sets axis 2 to 5, but the model fixes it at 3"),
])
def test_bad_input_shape(model_path, tmp_path, spec, message):
    out = tmp_path / "o.onnx"
    r = cli("convert", model_path, "-o", out, "--input-shape", spec)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_input_shape_onnxsim_spelling(model_path, tmp_path):
    r = cli("convert", model_path, "-o", tmp_path / "o.onnx", "--input-shape", "x:3,4,3,3", "--check")
    assert r.returncode == 0 and "inputs x [3,4,3,3]" in r.stdout, r.stderr


def test_output_equal_to_input_is_refused(model_path):
    before = digest(model_path)
    r = cli("convert", model_path, "-o", model_path)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert digest(model_path) == before


def test_output_folder_missing(model_path, tmp_path):
    r = cli("convert", model_path, "-o", tmp_path / "nope" / "o.onnx")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_unavailable_provider(model_path, tmp_path):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    r = cli("convert", model_path, "-o", tmp_path / "o.onnx", "--check", "--provider", "cuda")
    assert r.returncode == 2 and "'cuda' is not available" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_usage_error_is_exit_2():
    r = cli("convert")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_inputs_npz(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    good = tmp_path / "in.npz"
    np.savez(good, x=np.random.default_rng(0).standard_normal((5, 4, 3, 3)).astype(np.float32))
    r = cli("convert", model_path, "-o", out, "--check", "--inputs", good)
    assert r.returncode == 0 and "1 run, inputs x [5,4,3,3]" in r.stdout, r.stderr
    for name, arr, message in [("wrongname", dict(y=np.zeros((1, 4, 3, 3), np.float32)), "missing x"),
                               ("wrongdtype", dict(x=np.zeros((1, 4, 3, 3), np.float64)), "dtype float64"),
                               ("wrongshape", dict(x=np.zeros((1, 4, 2, 3), np.float32)), "shape [1, 4, 2, 3]")]:
        p = tmp_path / f"{name}.npz"
        np.savez(p, **arr)
        out2 = tmp_path / f"{name}.onnx"
        r = cli("convert", model_path, "-o", out2, "--check", "--inputs", p)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not out2.exists()
