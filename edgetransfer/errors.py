"""Every exception edgetransfer raises for a problem a user can fix, in one place.

Each message says what was wrong and what to do about it, in one line; the CLI prints it as is
and exits non-zero. Anything else escaping the library is a bug: the CLI says so, and shows the
traceback with ``--debug`` (or ``EDGETRANSFER_DEBUG=1``).

The runtime's errors (``edgetransfer.runtime.errors``) are re-exported here; the rest are the
toolkit's.
"""

from __future__ import annotations

from .runtime.errors import (
    DataError,
    EdgeTransferError,
    ImageError,
    MissingDependencyError,
    OpenVinoError,
    OptionError,
    PredictorError,
    UnknownNameError,
    first_line,
    unknown_name,
)

__all__ = [
    # the runtime's errors and helpers, re-exported
    "EdgeTransferError",
    "OptionError",
    "MissingDependencyError",
    "UnknownNameError",
    "DataError",
    "PredictorError",
    "ImageError",
    "OpenVinoError",
    "unknown_name",
    "first_line",
    # the toolkit's
    "ModelError",
    "WeightsError",
    "RunError",
    "ExportError",
    "ParityError",
    "QuantizationError",
    "EngineMismatchError",
    "TritonError",
]


class ModelError(EdgeTransferError):
    """An architecture cannot be built or its classifier cannot be swapped."""


class WeightsError(ModelError):
    """Pretrained weights cannot be found, fetched or loaded into the architecture."""


class RunError(EdgeTransferError):
    """A run directory is missing, belongs to another run, holds a stale artifact, or cannot be resumed."""


class ExportError(EdgeTransferError):
    """The model cannot be expressed in ONNX or OpenVINO IR (the operator is named), or the file cannot be written."""


class ParityError(ExportError):
    """An exported model and PyTorch disagree beyond the tolerance."""


class QuantizationError(EdgeTransferError):
    """INT8 cannot meet the accuracy budget, calibration data is unusable, or the quantiser fails."""


class EngineMismatchError(EdgeTransferError):
    """A serialized TensorRT engine was built for another TensorRT version or GPU."""


class TritonError(EdgeTransferError):
    """A model a Triton repository cannot describe, or a ``config.pbtxt`` that does not match its model."""
