"""The library's version, in a module of its own so that any module can record it without
importing the package's __init__ (which imports the training module)."""

__version__ = "0.1.0"
