"""The converter as a library: Hugging Face directories (safetensors or PyTorch ``.bin``) and
GGUF files into converted checkpoint directories. ``tools/convert_hf.py`` and
``xlaserve convert`` are its command lines."""

from model.convert.build import build_params, convert
from model.convert.transforms import ConversionError

__all__ = ["ConversionError", "build_params", "convert"]
