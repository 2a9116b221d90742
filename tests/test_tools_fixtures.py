"""tools/fixtures (dev only) in the project's env: `describe` reads a fixture
and names its FCs through onnx_fc2conv's own inspect, not a detector of its
own; the exporter modules are not imported (they need torch/tensorflow/paddle)."""

import os
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]


def test_describe_names_the_fcs_through_inspect():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "tools.fixtures", "describe", "--only", "alexnet_narrow_ts"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    gemms = [n.name for n in onnx.load(str(ROOT / "tests" / "fixtures" / "alexnet_narrow_ts.onnx")).graph.node
             if n.op_type == "Gemm"]
    assert f"FCs (onnx_fc2conv.inspect): {len(gemms)}" in run.stdout, run.stdout
    for name in gemms:
        assert f"Gemm {name!r}: pattern" in run.stdout
    assert "=== alexnet_narrow_ts.onnx" in run.stdout and "=== alexnet_view" not in run.stdout   # --only
