"""The container image (top-level Dockerfile) built with podman and checked end to end by
``tools/container_check.py``: the bundled model answers a chat and a streamed chat through the
openai SDK, a mounted converted model dir is served, and SIGTERM ends each container with
status 0. Marked ``container`` (the build takes minutes): ``.ci/run`` runs it after the suite;
``pytest -m container`` runs it alone. Skipped where podman is not installed."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.container


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_image_builds_serves_and_stops_cleanly(default_checkpoint):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "container_check.py"), "--image", "xlaserve:test",
                        "--model-dir", str(default_checkpoint)], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    default, mounted = json.loads(lines["default"]), json.loads(lines["mounted"])
    assert default["model"] == "SmolLM2-135M-Instruct" and "Paris" in default["answer"]
    assert default["exit_status"] == 0 and mounted["exit_status"] == 0
    assert mounted["model"] == "m" and mounted["text"].strip()  # named after the mounted dir
    # Warmed at build time: the caches in the image serve the first start.
    assert default["ready_s"] < 60 and mounted["ready_s"] < 60, lines
