"""Build the container image with podman and check it end to end, by hand or from the tests.

    python tools/container_check.py [--image xlaserve:check] [--model-dir CONVERTED_DIR]

Steps, each reported on a line of its own:
1. the base image: ``debian:bookworm-slim`` made locally with debootstrap when no registry
   has it (root, Debian's packages reachable);
2. ``podman build`` of the top-level Dockerfile (the host's CA bundle handed in as a build
   secret, used by pip only), with the build time and the image's size;
3. a container of the image with no arguments but a port: time to a healthy ``/health``, a
   chat completion and a streamed one through the openai SDK, then SIGTERM and its exit status;
4. with ``--model-dir``, a container serving that converted directory mounted read-only.

podman runs rootful with runc and cgroupfs and without default ulimits, and with the host's
network (what works on machines without systemd or a registry). Exit status 0 when every
check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = "docker.io/library/debian:bookworm-slim"
CA = Path("/etc/ssl/certs/ca-certificates.crt")


class CheckFailed(Exception):
    pass


def podman_env() -> dict[str, str]:
    conf = Path(tempfile.gettempdir()) / "xlaserve-containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, capture: bool = True, timeout: float | None = None):
    cmd = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", *args]
    done = subprocess.run(cmd, env=podman_env(), capture_output=capture, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd[:6])}... failed ({done.returncode}): {(done.stderr or '')[-2000:]}")
    return done


def ensure_base() -> str:
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return "present"
    if shutil.which("debootstrap") is None:
        raise CheckFailed(f"{BASE} is not present and debootstrap is not installed")
    with tempfile.TemporaryDirectory() as rootfs:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian"],
                       check=True, capture_output=True, text=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        done = subprocess.run(["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", "import", "-", BASE],
                              stdin=tar.stdout, env=podman_env(), capture_output=True, text=True)
        tar.wait()
        if done.returncode != 0:
            raise CheckFailed(f"podman import failed: {done.stderr[-1000:]}")
    return "made with debootstrap"


def build(image: str, extras: str = "") -> tuple[float, int]:
    args = ["build", "--network=host", "-t", image, "-f", str(ROOT / "Dockerfile")]
    if CA.exists():
        args += ["--secret", f"id=ca,src={CA}"]
    if extras:
        args += ["--build-arg", f"EXTRAS={extras}"]
    t = time.monotonic()
    podman(*args, str(ROOT), timeout=3600)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    return time.monotonic() - t, size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, name: str, timeout: float = 300) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state not in ("running", "created", "configured"):
            logs = podman("logs", name, check=False)
            raise CheckFailed(f"container {name} is {state}: {(logs.stdout + logs.stderr)[-3000:]}")
        time.sleep(0.5)
    raise CheckFailed(f"{url}/health was not healthy within {timeout:.0f}s")


def stop(name: str) -> int:
    """SIGTERM, then the container's exit status."""
    podman("kill", "--signal", "TERM", name)
    status = podman("wait", name, timeout=120).stdout.strip().splitlines()[-1]
    return int(status)


def run(image: str, name: str, port: int, *command: str, volumes: tuple[str, ...] = ()) -> None:
    podman("rm", "-f", name, check=False)
    args = ["run", "-d", "--network=host", "--name", name]
    for v in volumes:
        args += ["-v", v]
    podman(*args, image, *command, "--server-port", str(port), "--server-name", "127.0.0.1")


def check_default(image: str) -> dict:
    import openai

    name, port = "xlaserve-check-default", free_port()
    url = f"http://127.0.0.1:{port}"
    run(image, name, port, "serve", "api_server")
    try:
        ready = wait_healthy(url, name)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = r.choices[0].message.content
        if not text:
            raise CheckFailed("the chat completion is empty")
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, temperature=0, max_tokens=16, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France?"}]) if c.choices]
        if "".join(pieces) != text:
            raise CheckFailed(f"the streamed answer {''.join(pieces)!r} differs from {text!r}")
        status = stop(name)
        return {"model": model, "ready_s": round(ready, 1), "answer": text, "exit_status": status}
    finally:
        podman("rm", "-f", name, check=False)


def check_mounted(image: str, model_dir: Path) -> dict:
    import openai

    name, port = "xlaserve-check-mounted", free_port()
    url = f"http://127.0.0.1:{port}"
    run(image, name, port, "serve", "api_server", "/models/m", volumes=(f"{model_dir}:/models/m:ro",))
    try:
        ready = wait_healthy(url, name)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
        if not r.choices[0].text:
            raise CheckFailed("the completion on the mounted model is empty")
        return {"model": model, "ready_s": round(ready, 1), "text": r.choices[0].text, "exit_status": stop(name)}
    finally:
        podman("rm", "-f", name, check=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="xlaserve:check")
    parser.add_argument("--extras", default="", help="the EXTRAS build arg (cuda for the GPU image)")
    parser.add_argument("--model-dir", type=Path, default=None, help="a converted model dir to mount and serve")
    parser.add_argument("--no-build", action="store_true", help="check an image already built")
    args = parser.parse_args(argv)
    if shutil.which("podman") is None:
        print("container_check: podman is not installed (apt-get install -y podman runc debootstrap)",
              file=sys.stderr)
        return 2
    try:
        print(f"base: {ensure_base()}", flush=True)
        if not args.no_build:
            seconds, size = build(args.image, args.extras)
            print(f"build: {seconds:.0f} s, image {size / 1e6:.0f} MB", flush=True)
        print(f"default: {json.dumps(check_default(args.image))}", flush=True)
        if args.model_dir:
            print(f"mounted: {json.dumps(check_mounted(args.image, args.model_dir.resolve()))}", flush=True)
    except (CheckFailed, subprocess.SubprocessError) as e:
        print(f"container_check: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
