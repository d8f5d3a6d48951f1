"""filedispatch: watch folders and deliver every new file where its rules send it."""

__version__ = "0.1.0"
__all__ = ["__version__"]
