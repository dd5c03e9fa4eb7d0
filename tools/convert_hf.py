"""Convert a Hugging Face checkpoint directory or a GGUF file into an xlaserve checkpoint.

    python tools/convert_hf.py SRC DST [--dtype bfloat16]      (also: xlaserve convert SRC DST)

The output directory holds ``xlaserve.json`` (format version + model config), ``params/``
(an orbax checkpoint of the param tree in ``model.weights``) and the tokenizer files. The
conversion itself is the library ``model.convert``; this is its command line.
"""

from __future__ import annotations

import argparse
import sys

from model.convert import ConversionError, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlaserve convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Hugging Face checkpoint directory or .gguf file")
    parser.add_argument("dst", help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="param dtype (default: the checkpoint's; float32 for GGUF)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.dtype)
    except ConversionError as e:
        print(f"xlaserve convert: error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
