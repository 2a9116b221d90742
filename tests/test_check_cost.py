"""What the check saves without proving less (issue 20): the dense check takes
the trunk's maps from the dense model's own run only where the dense model
computes them with the original trunk's nodes, weights and inputs, and then
reports exactly what running the original's trunk on its own reports."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_fc2conv import check, convert
from onnx_fc2conv.check import dense as dense_check
from test_equivariance import NOT_MIXING, pair

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def spy(monkeypatch):
    """The answers of dense._same_trunk; ``spy.off()`` makes it answer False."""
    answers = []
    real = dense_check._same_trunk

    def same(*args):
        answers.append(real(*args) and not answers_off)
        return answers[-1]

    answers_off = False
    monkeypatch.setattr(dense_check, "_same_trunk", same)

    class Spy(list):
        def off(self):
            nonlocal answers_off
            answers_off = True
    spy = Spy()
    spy.answers = answers
    return spy


@pytest.mark.parametrize("name", ["vgg_narrow_dynamo.onnx", "alexnet_narrow_dynamo.onnx"])
def test_shared_trunk_reports_what_the_trunk_run_reports(name, spy):
    path = FIXTURES / name
    dense = convert(path, dense=True).model
    shared = check(path, dense, dense=True)
    assert spy.answers == [True]
    spy.off()
    alone = check(path, dense, dense=True)
    assert spy.answers == [True, False]
    assert shared and shared == alone, "\n".join(shared.lines() + alone.lines())   # every figure, every line


def _tweak_trunk_weight(dense: onnx.ModelProto) -> None:
    t = next(t for t in dense.graph.initializer if t.name == "cw")
    w = onnx.numpy_helper.to_array(t).copy()
    w *= 1.5
    t.CopyFrom(onnx.numpy_helper.from_array(w, "cw"))


def _tweak_trunk_node(dense: onnx.ModelProto) -> None:
    next(n for n in dense.graph.node if n.op_type == "Relu").op_type = "Sigmoid"


def test_same_trunk_answers_false_on_any_difference(spy):
    original, dense = pair(NOT_MIXING)
    assert check(original, dense, dense=True) and spy.answers == [True]
    for tweak in (_tweak_trunk_weight, _tweak_trunk_node):
        changed = onnx.ModelProto()
        changed.CopyFrom(dense)
        tweak(changed)
        report = check(original, changed, dense=True)
        assert spy.answers[-1] is False
        # the original's trunk ran: the windows compare the changed model with the original's maps
        assert not report and any("windows" in o.name and not o.passed for o in report.outputs), report.lines()
