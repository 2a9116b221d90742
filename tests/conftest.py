import collections
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every model the tool converts during the tests (in this process and in CLI
# subprocesses, which inherit the environment) must pass onnx's full check and
# strict shape inference where its original did: api.convert asserts it.
os.environ["ONNX_FC2CONV_STRICT"] = "1"

# Outcomes of the fuzz tests (test_properties.py), reported at the end of the run.
FUZZ = collections.Counter()


def pytest_terminal_summary(terminalreporter):
    if FUZZ:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(FUZZ.items()))
        terminalreporter.write_line(f"fuzz outcomes: {parts}")
