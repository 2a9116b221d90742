"""Print the consumer matrix as markdown: which converted models (keep and
dense mode) the onnx checker, tract, OpenVINO, onnxsim, onnxslim and
onnxoptimizer accept, with outputs equal to onnxruntime's.

    python tools/consumer_matrix.py [--models NAME ...] [--summary-only]

The checks are tests/consumers.py's, the ones tests/test_consumers.py runs;
see its docstring for what each cell means. Cells: ``ok``; ``FAIL: reason``
(the converted model fails); ``n/a (original fails: reason)`` (the consumer
fails on the original model too); ``-`` (dense mode refused for that model).

The first table has one row per model; the second, one row per consumer
(the README's "Works with" table). Exit status 1 when a cell is FAIL.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from consumers import CONSUMERS, MODES, Matrix, model_files, versions as consumer_versions  # noqa: E402

LABELS = {"checker": "onnx checker (full_check + strict inference)", "tract": "tract",
          "openvino": "OpenVINO (CPU, f32)", "onnxsim": "onnxsim → onnxruntime",
          "onnxslim": "onnxslim → onnxruntime", "onnxoptimizer": "onnxoptimizer → onnxruntime"}
REASON_CHARS = 100


def brief(reason: str) -> str:
    """The most specific part of a consumer's message, for a table cell:
    the last cause of tract's chain, onnxruntime's status message without
    its source location."""
    text = reason.split(": ", 1)[1] if reason.startswith(("dense mode refused: ", "n/a: ")) else reason
    text = re.sub(r"^\w+ fails on the original model too: ", "", text)
    text = text.split(" / ")[-1]
    text = text.split("Status Message: ")[-1]
    text = re.sub(r"^\S+\.(h|cc|cpp):\d+ .*?\) ", "", text)  # onnxruntime's file:line function(...)
    text = re.sub(r"^(onnxruntime cannot run the result: )?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"


def cell(status: str, reason: str) -> str:
    if status == "FAIL":
        return f"FAIL: {brief(reason)}"
    if status == "n/a":
        return f"n/a (original fails: {brief(reason)})"
    return status


def version_line(versions: dict) -> str:
    return "Tested with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."


def model_table(names, outcomes) -> list[str]:
    cols = [(c, m) for c in CONSUMERS for m in MODES]
    lines = ["| model | " + " | ".join(f"{c} {m}" for c, m in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name in names:
        lines.append(f"| `{name}` | " + " | ".join(cell(*outcomes[name, m, c]) for c, m in cols) + " |")
    return lines


def summary(consumer: str, mode: str, names, outcomes) -> str:
    """``all 20``, or ``19 of 22 (3 n/a)``: ok among the models the mode applies to."""
    statuses = [outcomes[n, mode, consumer][0] for n in names if outcomes[n, mode, consumer][0] != "-"]
    ok = statuses.count("ok")
    if ok == len(statuses):
        return f"all {ok}"
    rest = [f"{statuses.count(s)} {s}" for s in ("FAIL", "n/a") if s in statuses]
    return f"{ok} of {len(statuses)} ({', '.join(rest)})"


def consumer_table(versions, names, outcomes) -> list[str]:
    lines = ["| runtime / tool | version tested | keep | dense |", "|---|---|---|---|"]
    for c in CONSUMERS:
        version = versions["onnx"] if c == "checker" else versions[c]
        lines.append(f"| {LABELS[c]} | {version} | {summary(c, 'keep', names, outcomes)} | "
                     f"{summary(c, 'dense', names, outcomes)} |")
    return lines


def notes(names, outcomes) -> list[str]:
    """Every cell that is not ok, grouped by consumer, verdict and reason."""
    groups: dict = {}
    for (name, mode, consumer), (status, reason) in outcomes.items():
        if status in ("ok", "-"):
            continue
        groups.setdefault((consumer, status, brief(reason)), {}).setdefault(name, []).append(mode)
    lines = []
    for (consumer, status, reason), models in groups.items():
        which = ", ".join(f"`{n}` ({'/'.join(m)})" for n, m in models.items())
        verdict = "FAILS on the converted model" if status == "FAIL" else "n/a, fails on the original too"
        lines.append(f"- {consumer}: {which}: {verdict}: {reason}")
    refused = [n for n in names if outcomes[n, "dense", "checker"][0] == "-"]
    if refused:
        why = {brief(outcomes[n, "dense", "checker"][1]).split(" in the trunk")[0].split(" '")[0] for n in refused}
        lines.append(f"- dense mode is refused for {', '.join(f'`{n}`' for n in refused)} "
                     f"({', '.join(sorted(why))} in the trunk)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="model names (file stems); default: all")
    parser.add_argument("--summary-only", action="store_true", help="print only the per-consumer table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    models = model_files()
    names = args.models or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        print(f"consumer_matrix: unknown model(s) {', '.join(unknown)}; known: {', '.join(models)}", file=sys.stderr)
        return 2
    versions = consumer_versions()
    with tempfile.TemporaryDirectory(prefix="consumer_matrix.") as folder:
        matrix = Matrix(Path(folder), models)
        outcomes = {(n, m, c): matrix.outcome(n, m, c) for n in names for m in MODES for c in CONSUMERS}
    n_dense = sum(outcomes[n, "dense", "checker"][0] != "-" for n in names)
    print(version_line(versions))
    print(f"{len(names)} models ({n_dense} of them dense-convertible); outputs compared with onnxruntime "
          f"{versions['onnxruntime']}.")
    print()
    print("\n".join(consumer_table(versions, names, outcomes)))
    extra = notes(names, outcomes)
    if extra:
        print()
        print("\n".join(extra))
    if not args.summary_only:
        print()
        print("\n".join(model_table(names, outcomes)))
    return 1 if any(s == "FAIL" for s, _ in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
