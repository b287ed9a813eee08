"""The package version, in a leaf so that file formats can record it without importing the
models."""

__version__ = "0.1.0"
