"""ichpro: the reproducible companion to ICHPro (ISBI 2024)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ichpro")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
