"""edgetransfer: from a pretrained CNN to a fast, verified image classifier on an edge machine."""

__version__ = "0.1.0"
__all__ = ["__version__"]
