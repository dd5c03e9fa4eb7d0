"""The wheels a GPU machine needs and its image lacks, fetched here (where PyPI is reachable)
into ``.whl/``, for ``tools/gpu_check.sh`` to install there.

    python tools/gpu_wheels.py             # resolve for the GPU image and fill .whl/
    python tools/gpu_wheels.py --dry-run   # resolve only: every needed wheel exists for the target

The target is the GPU image (README, "GPUs"): CPython 3.12 on x86_64 with glibc 2.39
(Ubuntu 24.04), so wheels tagged manylinux_2_17 up to manylinux_2_39 all install there;
``--python`` and ``--glibc`` name another. pip resolves xlaserve's serving dependencies with
their own for that target; the wheels of projects the image already has (``PRESENT``) are
left out. ``.whl/`` is git-ignored, so it travels to the machine only when the check's
command carries it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What xlaserve serves with that the GPU image lacks (their own dependencies come with them).
NEEDED = ("gguf", "litestar", "msgspec", "uvicorn", "swagger-ui-bundle", "llguidance")
# Projects the GPU image has (its package list, 2026-11): never carried.
PRESENT = frozenset("""
absl-py anyio certifi charset-normalizer click filelock flax fsspec h11 httpcore httpx idna jax jaxlib jinja2
markdown-it-py markupsafe mdurl ml-dtypes msgpack numpy opt-einsum orbax-checkpoint packaging pillow pip
prometheus-client protobuf psutil pygments pyyaml regex requests rich safetensors sentencepiece setuptools six
tokenizers tqdm typing-extensions urllib3 uvloop wheel zipp pytest pluggy iniconfig typing-inspect
mypy-extensions python-dateutil tensorstore etils humanize nest-asyncio aiofiles simplejson treescope
multidict yarl frozenlist propcache aiohttp aiosignal attrs
""".split())


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_tags(glibc: str = "2.39", arch: str = "x86_64") -> list[str]:
    """Every manylinux tag a machine of this glibc installs, newest first (pip takes the
    first it finds a wheel for)."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise ValueError(f"glibc {glibc}: manylinux wheels start at 2.17")
    return [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]


def project_of(wheel: str) -> str:
    """The normalized project name of a wheel's file name."""
    return normalize(wheel.split("-", 1)[0])


def carried(wheels: list[str], present: frozenset[str] = PRESENT) -> list[str]:
    """The wheels to carry: those of projects the image lacks."""
    have = {normalize(p) for p in present}
    return sorted(w for w in wheels if w.endswith(".whl") and project_of(w) not in have)


def download(dest: Path, python: str, glibc: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python, "-d", str(dest)]
    for tag in platform_tags(glibc):
        cmd += ["--platform", tag]
    subprocess.run(cmd + ["--platform", "any", *NEEDED], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="resolve only; print what would be carried")
    ap.add_argument("--python", default="3.12")
    ap.add_argument("--glibc", default="2.39")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            download(Path(tmp), args.python, args.glibc)
        except subprocess.CalledProcessError as e:
            print(f"gpu_wheels: pip could not resolve every wheel for Python {args.python}, glibc {args.glibc} "
                  f"(exit {e.returncode})", file=sys.stderr)
            return 1
        wheels = carried([p.name for p in Path(tmp).iterdir()])
        size = sum((Path(tmp) / w).stat().st_size for w in wheels)
        print(f"{len(wheels)} wheels for Python {args.python}, glibc {args.glibc}, {size / 2**20:.1f} MiB:")
        for w in wheels:
            print("  " + w)
        if args.dry_run:
            return 0
        out = ROOT / ".whl"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for w in wheels:
            shutil.copy2(Path(tmp) / w, out / w)
    exclude = ROOT / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.whl/" not in exclude.read_text().split():
        with exclude.open("a") as f:
            f.write("/.whl/\n")
    print(f"in {out}: carry '.whl' with the working tree to the GPU machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
