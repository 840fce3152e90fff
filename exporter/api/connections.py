"""Bounded HTTP connections: a deadline for each request to arrive, and a cap that sheds idle ones first.

Invariants:
- A connection waiting for a request (none received yet, a request head or body still arriving,
  or idle between keep-alive requests) is closed `request_timeout` seconds after it began waiting:
  a client sending headers a byte at a time holds a descriptor for that long at most.
- At most `cap` connections are open. A new one over the cap closes the connection that has been
  waiting longest for a request; only when every open connection has a request in progress is the
  new one closed instead. So a flood of slow clients costs its own oldest connections, never a
  scrape that sends its request at once, and descriptors stay below the open-files limit.
- `effective_cap` keeps `cap` plus what one accept round can add under the soft RLIMIT_NOFILE.

The decisions (`effective_cap`, `victim`) are pure; `bounded_protocol` applies them in uvicorn's
h11 protocol, on the event loop thread only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from shared.logs import FAILURE, get_logger

T = TypeVar("T")

log = get_logger("exporter.connections")

# Connections asyncio accepts in one round of the loop (uvicorn's `backlog`): each holds a
# descriptor before the cap sees it, so this bounds what a burst can take at once.
ACCEPT_BACKLOG = 128
# Connections the kernel queues for accepting (set after uvicorn listened, which uses the above):
# queued ones cost no descriptor, and a full queue drops new SYNs, so a scrape arriving in a
# burst of slow clients would wait a second for its retransmit.
LISTEN_BACKLOG = 4096
# Descriptors the exporter needs besides connections: logs, inotify, pipes to scan workers and the
# cleaner, the audit log, scandir handles while scanning, the listening socket.
RESERVED_DESCRIPTORS = 128
MIN_CAP = 16


def effective_cap(configured: int, soft_limit: int | None) -> int:
    """The connection cap that fits the open-files soft limit (None: unlimited). Pure.

    An accepted socket holds a descriptor before the protocol sees it, and a shed connection frees
    its own only on the loop's next round: allow for up to three accept rounds in flight.
    """
    if soft_limit is None:
        return configured
    room = soft_limit - RESERVED_DESCRIPTORS - 3 * ACCEPT_BACKLOG
    return max(MIN_CAP, min(configured, room))


def victim(oldest_first: Iterable[T], waiting: Callable[[T], bool]) -> T | None:
    """The connection to shed: the oldest one waiting for a request, or None. Pure.

    Stops at the first: usually the oldest connection is a slow client's, so shedding costs O(1).
    """
    return next((connection for connection in oldest_first if waiting(connection)), None)


@dataclass
class ConnectionBook:
    """The open connections, oldest first, and what the cap has cost (for the log)."""

    cap: int
    open: dict[BoundedProtocol, None] = field(default_factory=dict)
    shed: int = 0
    refused: int = 0


def bounded_protocol(book: ConnectionBook, request_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the deadline and the cap above, sharing `book`."""

    class Protocol(BoundedProtocol):
        _book = book
        _request_timeout = request_timeout

    return Protocol


class BoundedProtocol(H11Protocol):
    _book: ConnectionBook
    _request_timeout: float

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, object],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._deadline: asyncio.TimerHandle | None = None

    # -- lifecycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        book = self._book
        book.open[self] = None
        if len(book.open) <= book.cap:
            return
        shed = victim((c for c in book.open if c is not self), BoundedProtocol.waiting_for_request) or self
        if shed is self:
            book.refused += 1
        else:
            book.shed += 1
        if book.shed + book.refused == 1 or (book.shed + book.refused) % 1000 == 0:
            log.warning(
                "http.connections_capped",
                cap=book.cap,
                shed_total=book.shed,
                refused_total=book.refused,
                outcome=FAILURE,
                error="too many open connections: the one waiting longest for a request is closed",
            )
        shed.close_now()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._book.open.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.DONE:
            self._disarm()  # the whole request is in: the app answers at its own pace

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is not h11.DONE:
            self._arm()  # kept alive: the next request has the same deadline to arrive

    def send_400_response(self, msg: str) -> None:
        # Unparseable HTTP gets the API's JSON error shape too, not uvicorn's plain text.
        body = b'{"error":{"code":"bad_request","message":"invalid HTTP request"}}'
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:
            pass  # mid-answer already: nothing more can be said on this connection
        self._book.open.pop(self, None)
        self._disarm()
        self.transport.close()  # not abort: the answer above is still to be written

    # -- state

    def waiting_for_request(self) -> bool:
        """True unless a request has fully arrived and its answer is not yet complete."""
        in_progress = self.cycle is not None and not self.cycle.response_complete
        return not (in_progress and self.conn.their_state is h11.DONE)

    def close_now(self) -> None:
        # Out of the book at once: its descriptor is freed only on the loop's next round, and
        # the connections accepted before then must each shed another one.
        self._book.open.pop(self, None)
        self._disarm()
        if not self.transport.is_closing():
            self.transport.abort()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.DONE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The app is waiting for a body that does not come; its own timeout answers 408.
            self._deadline = self.loop.call_later(self._request_timeout, self._expired)
            return
        self.close_now()
