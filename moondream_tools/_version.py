"""The installed version of moondream-tools (read once from the package metadata)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moondream-tools")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
