"""The prepared GPU check's own logic, on the CPU: the wheels' target tags and what is carried,
the check script's syntax and modes, and its smoke step on the tiny shape."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_wheels  # noqa: E402


def test_platform_tags_cover_every_manylinux_the_gpu_image_installs():
    tags = gpu_wheels.platform_tags("2.39")
    assert tags[0] == "manylinux_2_39_x86_64" and "manylinux_2_31_x86_64" in tags
    assert tags[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert len(tags) == 39 - 17 + 2
    assert gpu_wheels.platform_tags("2.28", "aarch64")[0] == "manylinux_2_28_aarch64"


def test_only_wheels_of_projects_the_image_lacks_are_carried():
    wheels = ["Litestar-2.25.0-py3-none-any.whl", "httpx-0.28.1-py3-none-any.whl",
              "llguidance-1.9.1-cp39-abi3-manylinux_2_31_x86_64.whl", "Typing_Extensions-4.15-py3-none-any.whl",
              "msgspec-0.23.0-cp312-cp312-manylinux_2_17_x86_64.whl", "notes.txt"]
    assert gpu_wheels.carried(wheels) == ["Litestar-2.25.0-py3-none-any.whl",
                                          "llguidance-1.9.1-cp39-abi3-manylinux_2_31_x86_64.whl",
                                          "msgspec-0.23.0-cp312-cp312-manylinux_2_17_x86_64.whl"]


def test_check_script_parses_and_refuses_unknown_modes():
    assert subprocess.run(["bash", "-n", str(ROOT / "tools/gpu_check.sh")]).returncode == 0
    r = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_smoke_step_prints_versions_and_the_kernel_against_xla_on_the_tiny_shape():
    r = subprocess.run([sys.executable, str(ROOT / "tools/bench_gpu.py"), "--shape", "tiny", "--parts",
                        "versions,kernel"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "versions: jax " in r.stdout
    diffs = [float(line.rsplit(" ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("attention, ")]
    assert len(diffs) == 2 and max(diffs) < 2e-2  # bfloat16 inputs: the kernel and the gather agree
