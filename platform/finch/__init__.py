"""finch: fine-tune and serve LLMs on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("finch-llm")
except PackageNotFoundError:  # running from a source tree (e.g. Ray's py_modules) without installing
    __version__ = "0.0.0+source"
