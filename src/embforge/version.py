"""The package version: one place, read by packaging (pyproject.toml) and written into saved folders."""

__version__ = "0.1.0"
