"""Local mode does not open the machine: Ray's processes listen on every interface (Ray ignores
`_node_ip_address` for its gRPC servers), so each socket of the session outside loopback must refuse a call
that lacks the session's token. The token is per process, in a file only its owner can read."""

from __future__ import annotations

import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.integration

# One real method of each gRPC service a Ray node serves (GCS, raylet, object manager, core worker, agent).
METHODS = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
           "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
           "/ray.rpc.ReporterService/HealthCheck", "/ray.rpc.LogService/ListLogs")
LOOPBACK = ("0100007F", "00000000000000000000000001000000")  # 127.0.0.1 and ::1 as /proc/net prints them


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode → (address as /proc/net hex, port) of every listening TCP socket."""
    found = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                found[int(fields[9])] = (address, int(port, 16))
    return found


def descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(entry.parent.name)] = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, grown = {root}, True
    while grown:
        new = {pid for pid, parent in parents.items() if parent in found} - found
        found |= new
        grown = bool(new)
    return found


def sockets_of(pids: set[int]) -> set[tuple[int, str, int]]:
    table, owned = listening_sockets(), set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        owned |= {(pid, *table[int(link[8:-1])]) for link in links
                  if link.startswith("socket:[") and int(link[8:-1]) in table}
    return owned


def hosts(address: str) -> list[str]:
    """Where to reach a socket: IPv6 ones on ::1 (and 127.0.0.1 when dual-stack), IPv4 wildcard ones on
    127.0.0.1, others on their own address (/proc/net prints IPv4 as little-endian hex)."""
    if len(address) > 8:
        return ["127.0.0.1", "[::1]"]
    if address.strip("0") == "":
        return ["127.0.0.1"]
    return [".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))]


def grpc_codes(host: str, port: int, token: str | None) -> set[str]:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    codes = set()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in METHODS:
            call = channel.unary_unary(method, request_serializer=lambda x: x, response_deserializer=lambda x: x)
            try:
                call(b"", timeout=5, metadata=metadata)
                codes.add("OK")
            except grpc.RpcError as error:
                codes.add(error.code().name)
    return codes


def http_status(url: str, data: bytes | None = None) -> tuple[int | str, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as answer:
            return answer.status, answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (urllib.error.URLError, OSError) as error:
        return type(error).__name__, ""


def test_session_token_file_is_private(ray_local: None) -> None:
    assert os.environ["RAY_AUTH_MODE"] == "token"
    token_file = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(token_file.read_text()) == 64


def test_no_socket_outside_loopback_accepts_unauthenticated_calls(ray_local: None) -> None:
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text()
    exposed = sorted({s for s in sockets_of(descendants(os.getpid())) if s[1] not in LOOPBACK})
    assert exposed, "expected Ray's gRPC servers on the wildcard address (if not, tighten this test)"
    refused_grpc = 0
    for pid, address, port in exposed:
        reachable = [h for h in hosts(address) if "UNAVAILABLE" not in grpc_codes(h, port, None)
                     or not isinstance(http_status(f"http://{h}:{port}/")[0], str)]
        if not reachable:  # the socket is going away (a worker shutting down): it accepts nothing
            continue
        host = reachable[0]
        without = grpc_codes(host, port, None)
        if "UNAUTHENTICATED" in without:
            assert "OK" not in without, f"pid {pid} {host}:{port} answered a call without the token"
            assert "UNAUTHENTICATED" not in grpc_codes(host, port, token), "the token is accepted (control)"
            refused_grpc += 1
            continue
        status, kind = http_status(f"http://{host}:{port}/")
        if status in (401, 403):
            continue
        # a Prometheus exporter (read-only metrics, no way to submit work) is the only other thing allowed
        assert status == 200 and kind.startswith("text/plain"), f"pid {pid} {host}:{port}: {without} {status} {kind}"
        assert http_status(f"http://{host}:{port}/api/jobs/", b"{}")[0] not in (200, 201)
    assert refused_grpc >= 3  # at least the GCS, the raylet and a worker
