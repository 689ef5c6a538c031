"""`forgeline serve` through the installed console script: it starts (Ray, Serve, the deploy flow), answers a
request, and on SIGTERM stops cleanly with exit code 0, leaving no process of its session (the engine's own
process included) and no open port. In local mode it runs in Ray Serve's throughput-optimized mode by default: the
replica's direct-ingress URL it prints answers too, both HTTP ports listen on 127.0.0.1 only, and the engine's large
steps get the local Ray's 2 CPUs as torch threads."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.test_http import assert_default_allocator, free_port, model_dir  # noqa: F401  (the tiny exported model fixture)

pytestmark = pytest.mark.integration
FORGELINE = Path(sys.executable).parent / "forgeline"
READY = "Ctrl-C (or SIGTERM) to stop"


def session_processes(session_id: int) -> list[str]:
    """Command lines of live processes in the process session `session_id` (all of the server's descendants
    unless one started its own session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            found.append(f"{stat.parent.name}: {cmdline.strip()[:120]}")
    return found


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6, where an address is
    stored as 32-bit words in host (little-endian) order)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                found.add(str(ipaddress.ip_address(raw)))
    return found


def test_serve_starts_answers_and_stops_cleanly_on_sigterm(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"name: clitest\nrun_dir: {tmp_path / 'run'}\ningest:\n  inputs: [unused.jsonl]\n"
                      "ray:\n  num_cpus: 2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PREFECT_API_URL"))}
    env["FORGELINE_HOME"] = str(tmp_path / "home")
    server = subprocess.Popen(
        [str(FORGELINE), "serve", str(config), "--model", str(model_dir), "--port", str(port), "--engine-cpus", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(server.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(READY in line for line in output):
            assert server.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            time.sleep(0.5)
        assert any(f"http://127.0.0.1:{port}" in line for line in output)
        direct = f"http://127.0.0.1:{port + 1}"
        assert any(f"direct ingress (first replica, no proxy hop): {direct}/v1" in line for line in output), output
        assert listening_addresses(port) == {"127.0.0.1"} and listening_addresses(port + 1) == {"127.0.0.1"}
        health = httpx.get(f"{direct}/health", timeout=30).json()
        assert health["torch_threads"] == 2  # local default: Ray's num_cpus
        assert_default_allocator(health["preloaded"])
        for base in (f"http://127.0.0.1:{port}", direct):
            answer = httpx.post(f"{base}/v1/completions", timeout=60,
                                json={"model": "clitest", "prompt": "the cat", "max_tokens": 4, "temperature": 0})
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 4
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0, "".join(output[-30:])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    for closed in (port, port + 1):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{closed}/v1/models", timeout=5)
    deadline = time.monotonic() + 30
    while (left := session_processes(server.pid)) and time.monotonic() < deadline:
        time.sleep(1)
    for line in left:  # do not leave them running for the rest of the suite
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert left == [], f"processes left after SIGTERM: {left}"
