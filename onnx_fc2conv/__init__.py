"""onnx-fc2conv: turn the fully connected layers of ONNX models into
convolutions and prove the result equal with onnxruntime."""

from .api import ConversionResult, InspectResult, check, convert, convert_graph, inspect
from .errors import Fc2ConvError
from .find import Layer
from .save import save
from .scanning import scan
from .verify import CheckReport, OutputReport

__all__ = ["convert", "check", "inspect", "convert_graph", "save", "ConversionResult", "InspectResult",
           "CheckReport", "OutputReport", "Layer", "Fc2ConvError", "scan"]
__version__ = "0.1.0"
