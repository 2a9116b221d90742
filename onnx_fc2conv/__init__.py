"""onnx-fc2conv: turn the fully connected layers of ONNX models into
convolutions and prove the result equal with onnxruntime."""

# The check package first: importing it binds the name ``check`` to it, and
# the public ``check`` function below must be what that name holds.
from .check import CheckReport, OutputReport
from .api import ConversionResult, InspectResult, check, convert, convert_graph, inspect  # noqa: E402
from .errors import Fc2ConvError
from .find import Layer
from .save import save
from .scanning import scan

__all__ = ["convert", "check", "inspect", "convert_graph", "save", "ConversionResult", "InspectResult",
           "CheckReport", "OutputReport", "Layer", "Fc2ConvError", "scan"]
__version__ = "0.1.0"
