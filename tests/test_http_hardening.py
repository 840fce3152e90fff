"""The HTTP layer as an attacker on the same host sees it: forged addresses, slow clients, redirects."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import resource
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from exporter.api.connections import (
    ACCEPT_BACKLOG,
    RESERVED_DESCRIPTORS,
    ConnectionBook,
    bounded_protocol,
    effective_cap,
    victim,
)
from tests.support import (
    VENV_BIN,
    Proc,
    exporter_env,
    free_port,
    make_model,
    parse_metrics,
    start_exporter,
    start_process,
    wait_until,
)

ADMIN = "admin-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"


def audit_lines(base: Path) -> list[dict[str, Any]]:
    path = base / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----- pure decisions ------------------------------------------------------------------------------


def test_the_cap_leaves_room_for_accept_rounds_and_the_exporter_under_the_soft_limit() -> None:
    assert effective_cap(2048, None) == 2048
    assert effective_cap(2048, 524288) == 2048
    assert effective_cap(256, 1024) == 256
    assert effective_cap(4096, 1024) == 1024 - RESERVED_DESCRIPTORS - 3 * ACCEPT_BACKLOG
    assert effective_cap(4096, 65536) == 4096
    assert effective_cap(256, 100) == 16  # never below a usable floor; the warning says why


def test_the_oldest_connection_waiting_for_a_request_is_shed_first() -> None:
    def waiting(connection: tuple[str, bool]) -> bool:
        return connection[1]

    assert victim([("a", False), ("b", True), ("c", True)], waiting) == ("b", True)
    assert victim([("a", True), ("b", False)], waiting) == ("a", True)
    assert victim([("a", False), ("b", False)], waiting) is None  # all being answered: refuse the newcomer
    assert victim([], waiting) is None


class _Transport(asyncio.Transport):
    """The edge a protocol writes to: records being aborted; its descriptor is freed only later."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8470), "peername": ("127.0.0.1", self.port)}.get(name, default)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("no request is sent in this test")


def test_connections_accepted_before_a_shed_one_is_gone_each_shed_another() -> None:
    # The race the flood found: a shed connection's descriptor is freed on the loop's next round,
    # and every connection accepted in this round used to pick that same, already closing, victim.
    loop = asyncio.new_event_loop()
    try:
        book = ConnectionBook(cap=3)
        protocol_class = bounded_protocol(book, request_timeout=10.0)
        config = Config(_no_app, http=protocol_class, log_config=None, lifespan="off")
        state = ServerState()
        protocols = [protocol_class(config, state, {}, _loop=loop) for _ in range(6)]
        transports = [_Transport(40000 + i) for i in range(6)]
        for protocol, transport in zip(protocols, transports, strict=True):
            protocol.connection_made(transport)  # one accept round: no connection_lost in between
        assert [t.aborted for t in transports] == [True, True, True, False, False, False]
        assert list(book.open) == protocols[3:] and book.shed == 3
        for protocol in protocols:
            protocol.connection_lost(None)
        assert not book.open
    finally:
        loop.close()


async def _never_answers(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.Event().wait()


@pytest.mark.parametrize("seed", range(5))
def test_the_book_matches_a_model_over_random_opens_requests_and_closes(seed: int) -> None:
    # Independent oracle: a list of (connection, answering) oldest first, shed by the rule as stated.
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    try:
        book = ConnectionBook(cap=8)
        protocol_class = bounded_protocol(book, request_timeout=10.0)
        config = Config(_never_answers, http=protocol_class, log_config=None, lifespan="off")
        state = ServerState()
        model: list[tuple[Any, bool]] = []
        for step in range(3000):
            action = rng.random()
            if action < 0.5 or not model:
                protocol = protocol_class(config, state, {}, _loop=loop)
                protocol.connection_made(_Transport(step))
                model.append((protocol, False))
                if len(model) > book.cap:
                    shed = next((entry for entry in model[:-1] if not entry[1]), model[-1])
                    model.remove(shed)
                    assert shed[0].transport.is_closing(), (seed, step)
            elif action < 0.7:
                index = rng.randrange(len(model))
                connection, answering = model[index]
                if not answering:
                    connection.data_received(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    model[index] = (connection, True)
            else:
                connection, _ = model.pop(rng.randrange(len(model)))
                connection.connection_lost(None)
            assert list(book.open) == [connection for connection, _ in model], (seed, step)
            assert len(book.open) <= book.cap
        assert book.shed > 100, "the cap was never under pressure"
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


# ----- 1. forged client addresses ---------------------------------------------------------------


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(store: Path, logs_dir: Path) -> None:
    proc = start_exporter(store / "models", store, logs_dir, STORAGE_ADMIN_TOKEN=ADMIN)
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            for i in range(300):
                forged = {"X-Forwarded-For": f"198.51.{i // 250}.{i % 250 + 1}", "Authorization": f"Bearer {WRONG}"}
                assert client.post("/storage/collect", headers=forged).status_code == 401
            admin = {"X-Forwarded-For": "198.51.100.7", "Authorization": f"Bearer {ADMIN}"}
            assert client.post("/storage/collect", headers=admin).status_code == 200
    finally:
        assert proc.stop() == 0
    lines = audit_lines(store)
    refused = [e for e in lines if e["operation"] == "api.auth_failed"]
    assert len(refused) == 60, len(refused)  # the per-address throttle, keyed by the real peer
    assert {e["details"]["remote"] for e in refused} == {"127.0.0.1"}
    collect = [e for e in lines if e["operation"] == "api.collect"]
    assert [e["details"]["remote"] for e in collect] == ["127.0.0.1"]
    assert proc.log().count("api.refusals_throttled") == 1


def test_a_trusted_proxy_names_the_client(store: Path, logs_dir: Path) -> None:
    proc = start_exporter(
        store / "models", store, logs_dir, STORAGE_ADMIN_TOKEN=ADMIN, STORAGE_TRUSTED_PROXIES="127.0.0.0/8"
    )
    try:
        headers = {"X-Forwarded-For": "198.51.100.7", "Authorization": f"Bearer {ADMIN}"}
        assert httpx.post(proc.url + "/storage/collect", headers=headers, timeout=30).status_code == 200
    finally:
        assert proc.stop() == 0
    assert [e["details"]["remote"] for e in audit_lines(store)] == ["198.51.100.7"]


# ----- 3. no redirects ----------------------------------------------------------------------------

UNKNOWN_PATHS = [
    ("GET", "/storage/info/"),
    ("POST", "/storage/cleanup/"),
    ("POST", "/storage/collect/"),
    ("GET", "/metrics/"),
    ("GET", "/readyz/"),
    ("GET", "/docs/"),
    ("GET", "//evil.example/metrics"),
    ("GET", "/nothing-here"),
]


@pytest.fixture
def exporter(store: Path, logs_dir: Path) -> Iterator[Proc]:
    proc = start_exporter(store / "models", store, logs_dir, STORAGE_ADMIN_TOKEN=ADMIN)
    yield proc
    assert proc.stop() == 0


@pytest.mark.parametrize(("method", "path"), UNKNOWN_PATHS)
def test_unknown_paths_trailing_slash_included_are_a_404_that_never_names_the_host(
    exporter: Proc, method: str, path: str
) -> None:
    host = "evil.example"
    with socket.create_connection(("127.0.0.1", int(exporter.url.rsplit(":", 1)[1])), timeout=10) as sock:
        request = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN}\r\n"
        sock.sendall((request + "Content-Length: 0\r\nConnection: close\r\n\r\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head
    assert b"location:" not in head.lower()
    assert b"application/json" in head
    assert json.loads(body)["error"]["code"] == "not_found"
    assert host.encode() not in answer and b"evil" not in answer


def test_unparseable_http_is_a_400_in_the_json_error_shape(exporter: Proc) -> None:
    with socket.create_connection(("127.0.0.1", int(exporter.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\nBad Header\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head, answer
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert b"evil" not in answer


# ----- 2. slow clients ----------------------------------------------------------------------------


def test_a_partial_request_or_an_idle_connection_is_closed_after_its_timeout(store: Path, logs_dir: Path) -> None:
    proc = start_exporter(
        store / "models",
        store,
        logs_dir,
        STORAGE_ADMIN_TOKEN=ADMIN,
        STORAGE_HTTP_REQUEST_TIMEOUT_SECONDS="1",
        STORAGE_HTTP_KEEPALIVE_TIMEOUT_SECONDS="1",
    )
    port = int(proc.url.rsplit(":", 1)[1])
    try:
        partial = socket.create_connection(("127.0.0.1", port), timeout=15)
        partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        dribble_until = started + 3
        while time.monotonic() < dribble_until:  # a byte at a time does not extend the deadline
            try:
                partial.sendall(b"a")
            except OSError:
                break
            time.sleep(0.2)
        assert partial.recv(100) == b""
        assert time.monotonic() - started < 5
        partial.close()
        # A body announced and never sent: a 408 JSON answer, not a held connection.
        with socket.create_connection(("127.0.0.1", port), timeout=15) as body:
            body.sendall(
                b"POST /storage/collect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + ADMIN.encode()
                + b"\r\nContent-Length: 100\r\n\r\n"
            )
            answer = b""
            while chunk := body.recv(65536):  # the server closes it once answered: the body never came
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer, answer
        # Kept alive, then idle: closed after the keep-alive timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=15) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b'"alive"}' not in first:
                first += idle.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            answered = time.monotonic()
            assert idle.recv(100) == b""
            assert time.monotonic() - answered < 4
    finally:
        assert proc.stop() == 0


FLOOD_CONNECTIONS = 1100
FLOOD_SECONDS = 8.0
FLOOD_MAX_CONNECTS = 12000  # re-opened as the server sheds them, up to this many in all
FLOOD_RECONNECT_SECONDS = 1.0  # how often the flood re-opens what was closed (slowloris: 15 s)
EXPORTER_SOFT_NOFILE = 1024  # systemd's default soft limit for a service without LimitNOFILE=


def raise_own_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, f"hard open-files limit {hard} < {needed}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def descriptors(pid: int) -> tuple[int, int]:
    """(all open descriptors, sockets) of `pid`, from /proc."""
    total = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        total += 1
        sockets += target.startswith("socket:")
    return total, sockets


def probe(port: int, path: str) -> int:
    """GET on a new connection, as a scrape after the keep-alive ran out: the status, 0 if none."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        connection.close()


class Flood:
    """FLOOD_CONNECTIONS clients that send part of a request head and wait; closed ones re-open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.connects = 0
        self.refused = 0
        self.open: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, name="slow-client-flood")

    def _connect(self) -> None:
        self.connects += 1
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: flood\r\nX-Slow: ")
            sock.setblocking(False)
            self.open.append(sock)
        except OSError:
            self.refused += 1

    def _run(self) -> None:
        while len(self.open) < FLOOD_CONNECTIONS and self.connects < FLOOD_MAX_CONNECTS:
            self._connect()
        while not self.stop.wait(FLOOD_RECONNECT_SECONDS):
            still = []
            for sock in self.open:
                try:
                    closed = sock.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    sock.close()
                else:
                    still.append(sock)
            self.open = still
            while len(self.open) < FLOOD_CONNECTIONS and self.connects < FLOOD_MAX_CONNECTS:
                self._connect()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(30)
        for sock in self.open:
            sock.close()


@pytest.mark.parametrize(
    ("ulimit", "p99_bound"),
    [
        (f"-Sn {EXPORTER_SOFT_NOFILE}", 1.0),
        # Every flood connection over the cap then costs an accept and a shed, and the flood
        # re-opens each one: a second on a busy 2-core machine is not always enough.
        (f"-n {EXPORTER_SOFT_NOFILE}", 2.0),
    ],
    ids=["systemd default soft limit", "hard limit 1024 too"],
)
def test_metrics_answer_and_the_index_stays_exact_under_a_slow_client_flood(
    ulimit: str, p99_bound: float, store: Path, logs_dir: Path
) -> None:
    raise_own_nofile(FLOOD_CONNECTIONS + 512)
    make_model(store / "models", "raw", "before", {"w.bin": b"x" * 100})
    port = free_port()
    env = exporter_env(store / "models", store, STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{port}", STORAGE_ADMIN_TOKEN=ADMIN)
    # The soft limit a systemd service gets by default (which the exporter raises to the hard one),
    # or a hard limit as low, where the connection cap alone keeps descriptors in bounds.
    command = f"ulimit {ulimit} && exec {VENV_BIN / 'model-storage-exporter'}"
    proc = start_process(
        ["bash", "-c", command], logs_dir / "flood.log", f"http://127.0.0.1:{port}", "/readyz", env=env
    )
    try:  # stopped whatever fails, by its PID
        pid = proc.popen.pid
        limits = Path(f"/proc/{pid}/limits").read_text().split("Max open files")[1].split()
        soft_in_force, hard = int(limits[0]), int(limits[1])
        assert soft_in_force == hard, "the exporter raises its soft open-files limit to the hard one"
        flood = Flood(port)
        latencies: list[float] = []
        statuses: list[int] = []
        peak_fds = peak_sockets = 0
        try:
            flood.thread.start()
            wait_until(lambda: len(flood.open) >= FLOOD_CONNECTIONS // 2, timeout=60, what="flood under way")
            started = time.monotonic()
            wrote = False
            while time.monotonic() - started < FLOOD_SECONDS and len(latencies) < 200:
                if not wrote and time.monotonic() - started > FLOOD_SECONDS / 2:
                    make_model(store / "models", "raw", "during-flood", {"w.bin": b"y" * 4321})
                    wrote = True
                t0 = time.monotonic()
                statuses.append(probe(port, "/metrics"))
                latencies.append(time.monotonic() - t0)
                fds, sockets = descriptors(pid)
                peak_fds, peak_sockets = max(peak_fds, fds), max(peak_sockets, sockets)
                time.sleep(0.05)
            ready = probe(port, "/readyz")
            held = len(flood.open)
        finally:
            flood.close()
        p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
        print(
            f"\nflood: {flood.connects} connects, {held} client connections open at the end, "
            f"peak server descriptors {peak_fds} ({peak_sockets} sockets), limit {soft_in_force}; "
            f"/metrics {len(latencies)} probes, p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
        )
        assert statuses == [200] * len(statuses), statuses
        assert ready == 200
        assert p99 < p99_bound, latencies
        assert peak_fds < soft_in_force
        if soft_in_force <= EXPORTER_SOFT_NOFILE:  # only the cap keeps the descriptors in bounds here
            assert peak_fds < EXPORTER_SOFT_NOFILE - RESERVED_DESCRIPTORS // 2
            assert '"cap": 512' in proc.log() and "http.connection_cap_lowered" in proc.log()
        assert held >= FLOOD_CONNECTIONS // 4, "the flood did not hold connections: it measured nothing"

        def counted() -> bool:
            text = httpx.get(proc.url + "/metrics", timeout=5).text
            key = ("model_storage_model_bytes", frozenset({("tier", "raw"), ("model", "during-flood")}))
            return parse_metrics(text).get(key) == 4321

        wait_until(counted, timeout=30, what="the model written during the flood is counted")
        # The flood's connections are all let go within the request timeout (10 s by default).
        wait_until(lambda: descriptors(pid)[1] < 20, timeout=30, what="flood connections closed")
    finally:
        returncode = proc.stop()
    assert returncode == 0
    assert "Too many open files" not in proc.log()
