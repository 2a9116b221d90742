"""The keep-mode check: the converted model equals the original on the same inputs.

Both models run on the same provider (check/run.py: one store of weights for
both, so a Conv kernel whose bytes are its FC matrix's is held once) on
seeded random inputs (batch 2 where the batch dim is free), several runs, or
on the user's inputs; every output is compared (check/compare.py). The
original runs first: a model that cannot run is bad input (exit 2), whatever
the converted one does.
"""

from __future__ import annotations

import onnx

from ..errors import Fc2ConvError
from .compare import CheckReport, Comparisons, quant_steps
from .run import Runner, Step, concrete_shapes, load_inputs, random_inputs, run


def signature_errors(original: onnx.ModelProto, converted: onnx.ModelProto) -> list[str]:
    """Inputs and outputs must keep their names, dtypes and shapes."""
    errors = []
    for which, a, b in (("inputs", original.graph.input, converted.graph.input),
                        ("outputs", original.graph.output, converted.graph.output)):
        sig_a = [(v.name, v.type.SerializeToString()) for v in a]
        sig_b = [(v.name, v.type.SerializeToString()) for v in b]
        if which == "inputs":
            inits_a = {t.name for t in original.graph.initializer}
            inits_b = {t.name for t in converted.graph.initializer}
            sig_a = [s for s in sig_a if s[0] not in inits_a]
            sig_b = [s for s in sig_b if s[0] not in inits_b]
        if sig_a != sig_b:
            errors.append(f"the converted model's {which} differ from the original's in name, dtype or shape")
    return errors


def check_models(original, converted, *, provider: str = "cpu", inputs=None, atol=None, rtol=None,
                 input_shapes: dict | None = None, runs: int = 3, seed: int = 0,
                 original_proto: onnx.ModelProto | None = None,
                 converted_proto: onnx.ModelProto | None = None, runner: Runner | None = None) -> CheckReport:
    """Run both models and compare every output (keep mode).

    ``original``/``converted`` are paths or ModelProtos; the ``*_proto``
    arguments give their graphs (inputs, outputs, initializer names are
    enough for the original) when they are paths that were already loaded.
    """
    orig_proto = original_proto if original_proto is not None else original
    conv_proto = converted_proto if converted_proto is not None else converted
    runner = runner or Runner(provider)
    errors = signature_errors(orig_proto, conv_proto)
    s_orig = runner.session(original, "the original model")
    out_types = {o.name: o.type.tensor_type.elem_type for o in orig_proto.graph.output}
    # requantized outputs: the step of their DequantizeLinear (keep mode leaves the nodes after a head as they
    # are, so the converted graph holds them where the original is known only by its inputs and outputs)
    graph_of = orig_proto if len(orig_proto.graph.node) else conv_proto
    steps = quant_steps(graph_of) if isinstance(graph_of, onnx.ModelProto) else {}
    if isinstance(inputs, dict):
        feed_sets = [inputs]
    elif inputs is not None:
        feed_sets = [load_inputs(orig_proto, inputs)]
    else:
        shapes = concrete_shapes(orig_proto, input_shapes or {})
        feed_sets = [random_inputs(orig_proto, shapes, seed + i) for i in range(runs)]
    expected_sets = []
    for feeds in feed_sets:
        try:
            expected_sets.append(run(s_orig, feeds))
        except Exception as exc:  # ORT's message is the reason the original cannot run
            raise Fc2ConvError(f"onnxruntime cannot run the original model on inputs "
                               f"{ {k: list(v.shape) for k, v in feeds.items()} }: {str(exc).splitlines()[0]}; "
                               "fix the input shape with --input-shape or --inputs") from None
    del s_orig  # its weights stay in the runner only where the converted model shares them
    shapes_used = {k: list(v.shape) for k, v in feed_sets[0].items()}
    try:
        s_conv = runner.session(converted, "the converted model")
    except Fc2ConvError as exc:  # the converted model must load: if not, the check fails
        return CheckReport(False, provider, 0, {}, [], errors + [str(exc)])
    found = Comparisons(atol, rtol)
    for feeds, expected in zip(feed_sets, expected_sets):
        try:
            actual = run(s_conv, feeds)
        except Exception as exc:
            errors.append(f"onnxruntime cannot run the converted model: {str(exc).splitlines()[0]}")
            break
        with Step("keep", "comparison"):
            for name, e in expected.items():
                if name not in actual:
                    errors.append(f"output {name!r} is missing from the converted model")
                    continue
                found.add(name, e, actual[name], out_types.get(name, 0), steps.get(name))
    return found.report(provider, len(feed_sets), shapes_used, errors)
