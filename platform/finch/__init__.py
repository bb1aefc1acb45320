"""finch: fine-tune and serve LLMs on Ray."""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("finch-llm")
except PackageNotFoundError:  # running from a source tree (e.g. Ray's py_modules) without installing
    __version__ = "0.0.0+source"

# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a 4-bit matmul kernel from the
# Hugging Face hub (the `kernels` package) and warns on every process when it cannot; it then uses
# its own kernels, which finch's QLoRA tests check. Offline by design: not worth a line per process.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
