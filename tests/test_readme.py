"""The README's quick start, as written: its two commands, and the sample
models it points at."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands():
    cmds = quick_start()
    assert len(cmds) == 2
    assert cmds[0].startswith("python -m pip install . && onnx-fc2conv convert ")
    assert cmds[1] == 'python -m pip install -e ".[test]" && python -m pytest'


def test_ci_runs_the_second_command_verbatim():
    assert quick_start()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_first_command_converts_and_checks(tmp_path):
    """The step after the install, run as written from the repository root,
    with the output redirected into a temporary folder."""
    convert = quick_start()[0].split("&&", 1)[1].strip()
    args = shlex.split(convert)
    assert args[0] == "onnx-fc2conv"
    out = tmp_path / Path(args[args.index("-o") + 1]).name
    args[args.index("-o") + 1] = str(out)
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv"] + args[1:], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "converted in 1 head" in r.stdout and "check (cpu" in r.stdout and "FAILED" not in r.stdout
    assert not {"Gemm", "MatMul"} & {n.op_type for n in onnx.load(out).graph.node}


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.onnx")), ids=lambda p: p.name)
def test_every_sample_model_converts_and_passes(path, tmp_path):
    from onnx_fc2conv import check, convert

    assert path.stat().st_size < 2 * 1024 * 1024
    result = convert(path)
    assert result.layers and all(layer.converted for layer in result.layers)
    assert not {"Gemm", "MatMul"} & {n.op_type for n in result.model.graph.node}
    report = check(path, result.model)
    assert report, "\n".join(report.lines())
    dense = convert(path, dense=True)
    assert check(path, dense.model, dense=True)


def test_sample_models_are_listed():
    listed = (ROOT / "models" / "README.md").read_text()
    files = sorted(p.name for p in (ROOT / "models").glob("*.onnx"))
    assert len(files) >= 2 and "lenet.onnx" in files and "vgg_small.onnx" in files
    for name in files:
        assert name in listed


def _readme_commands(prefix: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line.strip() for block in re.findall(r"```\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.strip().startswith(prefix)]


def test_demo_command_is_the_one_the_demo_tool_runs():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import demo_heatmap
    finally:
        sys.path.pop(0)
    assert demo_heatmap.COMMAND in _readme_commands("onnx-fc2conv heatmap")


@pytest.mark.parametrize("flag", ["--keep-global-pools", "--dense-stride"])
def test_dense_mode_commands_run_as_written(flag, tmp_path):
    """The README's examples of --keep-global-pools and --dense-stride."""
    line = next(c for c in _readme_commands("onnx-fc2conv convert") if flag in c and "IN.onnx" not in c)
    args = shlex.split(line)
    args[args.index("-o") + 1] = str(tmp_path / "out.onnx")
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv"] + args[1:], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and "FAILED" not in r.stdout and (tmp_path / "out.onnx").exists()
