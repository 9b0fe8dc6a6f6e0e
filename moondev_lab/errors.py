"""The package's one exception root.

>>> from moondev_lab.errors import MoondevError
>>> issubclass(MoondevError, Exception)
True
"""
from __future__ import annotations


class MoondevError(Exception):
    """Base class of every error moondev_lab raises on purpose."""
