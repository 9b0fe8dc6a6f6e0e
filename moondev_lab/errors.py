"""The package's one exception root: every error moondev_lab raises on purpose derives from it."""


class MoondevError(Exception):
    """Base class of moondev_lab's own errors."""
