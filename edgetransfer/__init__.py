"""edgetransfer: from a pretrained CNN to a fast, verified image classifier on an edge machine.

The toolkit and the runtime are two distributions that share this package name:
``edgetransfer`` (this one) and ``edgetransfer-runtime``, which holds ``edgetransfer.runtime``
and needs neither torch nor onnx. Installed together they share one folder; from a source
checkout the runtime's sources are found beside the toolkit's (``runtime/src``) and take
precedence over an installed copy, so that an edit to either is what runs.
"""

from pathlib import Path
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
_checkout_runtime = Path(__file__).resolve().parent.parent / "runtime" / "src" / "edgetransfer"
if (_checkout_runtime / "runtime" / "__init__.py").is_file():
    __path__.insert(1, str(_checkout_runtime))

__version__ = "0.1.0"
__all__ = ["__version__"]
