"""The bad-input matrix: one test per row. Each asserts the exit code (2, or
1 for a failed check), a single line on stderr that names the file or node
and the problem, no traceback, no output file (or the previous one intact),
and the input's bytes unchanged."""

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import head_model
from helpers import parse
from onnx_fc2conv import cli

PREVIOUS = b"previous output\n"


def sha(path: Path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, want_code, *needles):
    lines = err.strip().splitlines()
    assert code == want_code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.onnx"
    onnx.save(head_model(chain=("Relu",), softmax=True), path)
    return path


def _fail_writes(monkeypatch, exc: BaseException) -> None:
    """Make the saver's file writes stop half-way with ``exc`` (a full disk, a Ctrl-C)."""
    save_mod = sys.modules["onnx_fc2conv.save"]  # the package's ``save`` name is the function
    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise exc

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.f.close()

    monkeypatch.setattr(save_mod.os, "fdopen", lambda fd, mode="r": Failing(real_fdopen(fd, mode)))


def convert_row(tmp_path, capsys, src, *extra, want=2, needles=(), previous=False):
    out = tmp_path / "out.onnx"
    if previous:
        out.write_bytes(PREVIOUS)
    before = sha(src) if isinstance(src, Path) else None
    code, _, err = run(["convert", src, "-o", out, "--check", *extra], capsys)
    assert_refused(code, err, want, *needles)
    if previous:
        assert out.read_bytes() == PREVIOUS
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if before:
        assert sha(src) == before
    return err


# -- files that are not usable models ------------------------------------------

def test_missing_path(tmp_path, capsys):
    convert_row(tmp_path, capsys, tmp_path / "nope.onnx", needles=("nope.onnx", "no such file"))


def test_directory(tmp_path, capsys):
    d = tmp_path / "dir.onnx"
    d.mkdir()
    convert_row(tmp_path, capsys, d, needles=("dir.onnx", "is a directory"))


def test_empty_file(tmp_path, capsys):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    convert_row(tmp_path, capsys, p, needles=("empty.onnx", "empty"))


def test_random_bytes(tmp_path, capsys):
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    convert_row(tmp_path, capsys, p, needles=("random.onnx", "not an ONNX model"))


def test_truncated_model(tmp_path, capsys, good):
    p = tmp_path / "truncated.onnx"
    p.write_bytes(good.read_bytes()[:-300])
    convert_row(tmp_path, capsys, p, needles=("truncated.onnx", "not an ONNX model"))


def test_protobuf_that_is_not_a_model(tmp_path, capsys):
    p = tmp_path / "tensor.onnx"
    p.write_bytes(onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "t").SerializeToString())
    convert_row(tmp_path, capsys, p, needles=("tensor.onnx", "not an ONNX model"))


def test_model_failing_the_checker(tmp_path, capsys):
    m = head_model()
    m.graph.node[0].op_type = "NoSuchOp"
    p = tmp_path / "checker.onnx"
    onnx.save(m, p)
    convert_row(tmp_path, capsys, p, needles=("checker.onnx", "fails onnx.checker"))


def test_unknown_opset_domain_in_head(tmp_path, capsys):
    m = parse("""
        <ir_version: 8, opset_import: ["" : 13, "com.example" : 1]>
        g (float[N,2,3,3] x) => (float[N,4] y) {
          f = Flatten(x)
          h = Gemm <transB=1> (f, w)
          y = com.example.Mystery(h)
        }""", w=np.ones((4, 18), np.float32))
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    convert_row(tmp_path, capsys, p, needles=("onnxruntime cannot load the original model", "Mystery"))


def test_graph_with_a_cycle(tmp_path, capsys):
    m = head_model()
    relu = onnx.helper.make_node("Relu", ["loop_b"], ["loop_a"])
    neg = onnx.helper.make_node("Neg", ["loop_a"], ["loop_b"])
    m.graph.node.extend([relu, neg])
    p = tmp_path / "cycle.onnx"
    onnx.save(m, p)
    convert_row(tmp_path, capsys, p, needles=("cycle.onnx", "fails onnx.checker"))


def test_dangling_input(tmp_path, capsys):
    m = head_model()
    m.graph.node[-1].input[0] = "never_produced"
    p = tmp_path / "dangling.onnx"
    onnx.save(m, p)
    convert_row(tmp_path, capsys, p, needles=("dangling.onnx", "fails onnx.checker"))


def test_fc_whose_k_differs_from_the_map(tmp_path, capsys):
    m = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,4] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
        }""", w=np.ones((4, 20), np.float32))
    p = tmp_path / "k.onnx"
    onnx.save(m, p)
    convert_row(tmp_path, capsys, p, needles=("FC 'y'", "K=20", "2*3*3 = 18"))


# -- options --------------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ("x=1,a,3", "does not parse"),
    ("x", "does not parse"),
    ("x=1,0,3,3", "positive integer"),
])
def test_malformed_input_shape(tmp_path, capsys, good, spec, message):
    convert_row(tmp_path, capsys, good, "--input-shape", spec, needles=(message, "NAME=D0,D1") if "parse" in message
                else (message,))


@pytest.mark.parametrize("spec,message", [
    ("nope=1,4,3,3", "not an input of the model; its inputs are: x"),
    ("x=1,4,3", "has rank 3, but input 'x' has rank 4"),
    ("x=1,4,5,5", "sets axis 2 to 5, but the model fixes it at 3"),
])
def test_mismatched_input_shape(tmp_path, capsys, good, spec, message):
    convert_row(tmp_path, capsys, good, "--input-shape", spec, needles=(message,))


@pytest.mark.parametrize("arrays,message", [
    (dict(y=np.zeros((1, 4, 3, 3), np.float32)), "missing x; unknown y"),
    (dict(x=np.zeros((1, 4, 3, 3), np.float64)), "dtype float64, the model wants float32"),
    (dict(x=np.zeros((1, 4, 2, 3), np.float32)), "shape [1, 4, 2, 3], the model wants [?,4,3,3]"),
])
def test_inputs_npz_that_does_not_match(tmp_path, capsys, good, arrays, message):
    npz = tmp_path / "in.npz"
    np.savez(npz, **arrays)
    convert_row(tmp_path, capsys, good, "--inputs", npz, needles=("in.npz", message))


def test_inputs_npz_used_when_it_matches(tmp_path, capsys, good):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.random.default_rng(0).standard_normal((5, 4, 3, 3)).astype(np.float32))
    code, out, err = run(["convert", good, "-o", tmp_path / "o.onnx", "--check", "--inputs", npz], capsys)
    assert code == 0 and "1 run, inputs x [5,4,3,3]): PASSED" in out, err


def test_output_equal_to_input(tmp_path, capsys, good):
    before = sha(good)
    code, _, err = run(["convert", good, "-o", good], capsys)
    assert_refused(code, err, 2, "good.onnx", "the output is the input file", "--overwrite")
    assert sha(good) == before


def test_output_equal_to_input_allowed_explicitly(tmp_path, capsys, good):
    code, _, err = run(["convert", good, "-o", good, "--overwrite", "--check"], capsys)
    assert code == 0, err
    assert "Gemm" not in [n.op_type for n in onnx.load(good).graph.node]


def test_output_folder_missing(tmp_path, capsys, good):
    code, _, err = run(["convert", good, "-o", tmp_path / "nope" / "o.onnx"], capsys)
    assert_refused(code, err, 2, "o.onnx", "does not exist")


def test_output_folder_not_writable(tmp_path, capsys, good, monkeypatch):
    """Root ignores permission bits, so the refusal is simulated at os.access."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path / "ro" else real(p, mode))
    (tmp_path / "ro").mkdir()
    code, _, err = run(["convert", good, "-o", tmp_path / "ro" / "o.onnx"], capsys)
    assert_refused(code, err, 2, "is not writable")
    assert not list((tmp_path / "ro").iterdir())


def test_disk_full_during_write(tmp_path, capsys, good, monkeypatch):
    """A write that fails half-way leaves the previous output and no temporary file."""
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    convert_row(tmp_path, capsys, good, want=2, needles=("out.onnx", "No space left on device"), previous=True)


def test_cuda_provider_without_cuda(tmp_path, capsys, good):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    convert_row(tmp_path, capsys, good, "--provider", "cuda", needles=("'cuda' is not available",
                                                                       "install onnxruntime-gpu"))


def test_failed_check_is_exit_1_and_keeps_previous_output(tmp_path, capsys, good, monkeypatch):
    from onnx_fc2conv import kernels
    real = kernels.fc_bias
    monkeypatch.setattr(kernels, "fc_bias", lambda c, m, beta=1.0: None if c is None else real(c, m, beta=beta) + 1)
    err = convert_row(tmp_path, capsys, good, want=1, needles=("failed its check", "out.onnx was not written"),
                      previous=True)
    assert "out.onnx" in err


# -- untrusted external data ---------------------------------------------

def _external(tmp_path, location, data_bytes=None, dims=(6, 36)):
    """A model whose first FC weight lives at ``location``."""
    m = head_model()
    w = next(t for t in m.graph.initializer if list(t.dims) == [6, 36])
    raw = w.raw_data if data_bytes is None else data_bytes
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend(dims)
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0")):
        e = w.external_data.add()
        e.key, e.value = k, v
    return m, raw


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "link.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, capsys, location):
    folder = tmp_path / "model"
    folder.mkdir()
    m, raw = _external(folder, location)
    (tmp_path / "outside.bin").write_bytes(raw)
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    p = folder / "m.onnx"
    p.write_bytes(m.SerializeToString())
    convert_row(folder, capsys, p, needles=("m.onnx", "outside the model's folder", "refusing"))


def test_external_data_shorter_than_declared(tmp_path, capsys):
    m, raw = _external(tmp_path, "w.bin")
    (tmp_path / "w.bin").write_bytes(raw[:100])
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString())
    convert_row(tmp_path, capsys, p, needles=("m.onnx", "reads past the end of 'w.bin'"))


def test_absurd_dims_refused_before_allocating(tmp_path, capsys):
    m, raw = _external(tmp_path, "w.bin", dims=(6, 36 * 10**9))
    (tmp_path / "w.bin").write_bytes(raw)
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString())
    convert_row(tmp_path, capsys, p, needles=("m.onnx", "reads past the end"))


def test_in_file_tensor_with_wrong_dims(tmp_path, capsys):
    m = head_model(fc="gemm_tb0")
    w = next(t for t in m.graph.initializer if list(t.dims) == [36, 6])
    del w.dims[:]
    w.dims.extend([36, 7])
    p = tmp_path / "dims.onnx"
    onnx.save(m, p)
    convert_row(tmp_path, capsys, p, needles=("dims.onnx",))


def test_real_process_one_line_no_traceback(tmp_path):
    """The same promises through a real process."""
    p = tmp_path / "notes.onnx"
    p.write_text("hello\n")
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "convert", str(p), "-o", str(tmp_path / "o.onnx")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "notes.onnx: not an ONNX model" in r.stderr


def test_interrupted_write_keeps_previous_output(tmp_path, capsys, good, monkeypatch):
    """Ctrl-C in the middle of writing: exit 130, the previous output intact, no temporary file."""
    _fail_writes(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "out.onnx"
    out.write_bytes(PREVIOUS)
    code, _, err = run(["convert", good, "-o", out], capsys)
    assert code == 130 and "interrupted" in err
    assert out.read_bytes() == PREVIOUS
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
