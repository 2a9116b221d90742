"""Provider selection: CPU by default, CUDA only where onnxruntime really
creates it; a missing or silently replaced provider is an exit-2 error."""

import subprocess
import sys
from pathlib import Path

import pytest

from builders import head_model
from onnx_fc2conv import Fc2ConvError, check
from onnx_fc2conv.check import run as check_run

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_session_uses_cpu():
    sess = check_run.session(head_model(), "cpu")
    assert sess.get_providers() == ["CPUExecutionProvider"]


def test_unknown_provider():
    with pytest.raises(Fc2ConvError, match="unknown provider 'tpu'"):
        check_run.session(head_model(), "tpu")


def test_cuda_absent_is_refused(monkeypatch):
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(Fc2ConvError, match="'cuda' is not available.*install onnxruntime-gpu"):
        check(head_model(), head_model(), provider="cuda")


def test_silent_fallback_to_cpu_is_detected(monkeypatch):
    """onnxruntime falls back to CPU silently when CUDA cannot start: the
    session's providers tell, and the check refuses."""
    import onnxruntime as ort

    real = ort.InferenceSession
    seen = {}

    def fake_session(src, sess_options=None, providers=None, **kw):
        seen["asked"] = providers
        return real(src, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with pytest.raises(Fc2ConvError, match="fell back to CPUExecutionProvider; refusing"):
        check_run.session(head_model(), "cuda")
    assert seen["asked"][0] == ("CUDAExecutionProvider", {"use_tf32": "0"})


def test_gpu_check_script_needs_a_gpu():
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the script runs for real there (tools/gpu_check.py)")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "needs an NVIDIA GPU and onnxruntime-gpu" in r.stderr
