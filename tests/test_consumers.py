"""The consumer matrix (consumers.py): every sample model and exporter
fixture, converted in keep and in dense mode, passes the full onnx checker and
strict shape inference, runs in tract and OpenVINO, and survives onnxsim,
onnxslim and onnxoptimizer, with outputs equal to onnxruntime's on the
original (keep) or on the dense model at two sizes (dense).

One test per (model, mode, consumer). Skipped, with the reason printed
(``-ra``), only where dense mode is refused or the consumer fails on the
ORIGINAL model too; a failure on the converted model alone fails the test.
``python tools/consumer_matrix.py`` prints the same matrix as a table."""

import pytest

from consumers import CONSUMERS, MODES, Matrix, NotApplicable, model_files

MODELS = model_files()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Shared by the whole module: each model is converted once per mode and
    each original runs once per consumer."""
    return Matrix(tmp_path_factory.mktemp("consumers"), MODELS)


def test_the_matrix_has_models():
    assert any(p.parent.name == "models" for p in MODELS.values())
    assert any(p.parent.name == "fixtures" for p in MODELS.values())


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_consumer_accepts_converted_model(matrix, name, mode, consumer):
    try:
        matrix.check(name, mode, consumer)
    except NotApplicable as exc:
        pytest.skip(str(exc))
