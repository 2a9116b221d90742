"""The check: prove a converted model equal to its original with onnxruntime.

Polygraphy's split: ``run.py`` (sessions over one store of weights, concrete
shapes, seeded or loaded inputs, ``run(session, feeds) -> dict``),
``compare.py`` (one comparison: float tolerances or quantization steps, and
the reports), ``keep.py`` (keep mode: equal outputs), ``dense.py`` (dense
mode: windows, pixel crops, translation equivariance), ``fine.py`` (the
à trous map against the plain one). The package never imports the pipeline
(api.py): what a check needs converted is handed to it.
"""

from .compare import CheckReport, OutputReport
from .dense import check_dense
from .fcn import check_convolutional
from .fine import check_fine
from .keep import check_models

__all__ = ["CheckReport", "OutputReport", "check_convolutional", "check_dense", "check_fine", "check_models"]
