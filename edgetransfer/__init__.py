"""edgetransfer: from a pretrained CNN to a fast, verified image classifier on an edge machine.

The toolkit and the runtime are two distributions that share this package name:
``edgetransfer`` (this one) and ``edgetransfer-runtime``, which holds ``edgetransfer.runtime``
and needs neither torch nor onnx. ``extend_path`` lets ``edgetransfer.runtime`` be found wherever
the runtime is installed: in the same folder, or (installed editable from a checkout with
``pip install -e ./runtime -e .``) in ``runtime/src``.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
__all__ = ["__version__"]
