"""Connection limits for the HTTP server: nobody holds the server by opening sockets and sending nothing.

uvicorn alone arms its keep-alive timer only after a response and disarms it on any byte, so a connection that
never sends a request, or drips one header line at a time, stays open for ever; and its `limit_concurrency` counts
such connections against the same cap as real requests, so a few hundred of them turn every request into a 503.
`GuardedH11Protocol` is uvicorn's HTTP/1.1 protocol with three rules added:

- **Request deadline**: a connection must deliver complete request headers within `header_timeout` seconds of
  connecting or of its previous response (whatever it sends meanwhile), or it is closed. The body then has the
  app's own body timeout (408).
- **Per-client cap**: one client address holds at most `max_per_client` connections. Past it the client's own
  longest-idle connection (no request in progress) is closed to make room; if all of them are busy, the newcomer
  is answered 503 with Retry-After.
- **Total cap**: at most `max_total` connections. Past it the longest-idle connection of anyone is closed; if none
  is idle, the newcomer gets 503 with Retry-After.

A connection is not closed to make room in its first second (nor in the second after a reply): a flood from one
address must not close a normal client's connection between its connect and its request, which on one address
(behind a proxy, or on loopback) is the only thing that tells them apart.

Busy connections (a request being read, queued, generated or streamed) are never closed to make room, so overload
turns away newcomers rather than starving the clients being served, and /health and /metrics stay reachable.
"""

from __future__ import annotations

import functools
import json
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class ConnectionGuard:
    """The open connections of one server, by client address (event-loop thread only)."""

    GRACE = 1.0  # seconds a new or just-answered connection is safe from being closed to make room: room is made
    # from long-idle connections, never from a client that connected a moment ago and is sending its request

    def __init__(self, *, max_total: int, max_per_client: int, header_timeout: float, retry_after: int = 1):
        if max_total < 1 or max_per_client < 1 or header_timeout <= 0:
            raise ValueError(f"need max_total >= 1, max_per_client >= 1 and header_timeout > 0; got {max_total}, "
                             f"{max_per_client} and {header_timeout}")
        self.max_total, self.max_per_client = max_total, max_per_client
        self.header_timeout, self.retry_after = header_timeout, retry_after
        self.clients: dict[str, set[GuardedH11Protocol]] = {}
        self.total = 0

    def admit(self, conn: GuardedH11Protocol, client: str) -> bool:
        """Register a new connection, closing a long-idle one if a cap is reached. False: refuse the newcomer."""
        mine = self.clients.setdefault(client, set())
        if len(mine) >= self.max_per_client:
            if sum(c.busy for c in mine) >= self.max_per_client:
                return False
            # Past the cap with idle connections: close the longest idle one. If all are in their grace period,
            # admit anyway; the total cap bounds that, and they are closed soon enough.
            self._close_longest_idle(mine)
        if self.total >= self.max_total:
            everyone = (c for conns in self.clients.values() for c in conns)
            if not self._close_longest_idle(everyone):
                return False
        mine.add(conn)
        self.total += 1
        return True

    def forget(self, conn: GuardedH11Protocol, client: str) -> None:
        mine = self.clients.get(client)
        if mine is not None and conn in mine:
            mine.discard(conn)
            self.total -= 1
            if not mine:
                del self.clients[client]

    def _close_longest_idle(self, conns) -> bool:
        now = time.monotonic()
        victim = min((c for c in conns if not c.busy and now - c.idle_since > self.GRACE),
                     key=lambda c: c.idle_since, default=None)
        if victim is not None:
            victim.close_idle()
        return victim is not None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol under a `ConnectionGuard` (see the module's docstring)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.client_key = ""
        self.request_deadline = None
        self.idle_since = time.monotonic()

    @property
    def busy(self) -> bool:
        """A request is in progress: its headers arrived and its response is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.client_key = self.client[0] if self.client else ""
        if not self.guard.admit(self, self.client_key):
            self.app = functools.partial(retry_later, seconds=self.guard.retry_after)
        self._arm_deadline()

    def connection_lost(self, exc) -> None:
        self.guard.forget(self, self.client_key)
        self._disarm_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_deadline()

    def close_idle(self) -> None:
        self.guard.forget(self, self.client_key)
        self._disarm_deadline()
        if not self.transport.is_closing():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass  # mid-way through a request's headers: nothing of ours to finish
            self.transport.close()

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self.idle_since = time.monotonic()
        self.request_deadline = self.loop.call_later(self.guard.header_timeout, self._deadline_passed)

    def _disarm_deadline(self) -> None:
        if self.request_deadline is not None:
            self.request_deadline.cancel()
            self.request_deadline = None

    def _deadline_passed(self) -> None:
        self.request_deadline = None
        if not self.busy:  # a request that arrived in time is governed by the app's own timeouts
            self.close_idle()


async def retry_later(scope, receive, send, *, seconds: int) -> None:
    """The answer to a connection refused for the caps: 503, Retry-After, and the connection closed."""
    body = json.dumps({"error": {"message": "the server has too many open connections; retry later",
                                 "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode()),
                            (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(guard: ConnectionGuard):
    """The `http` protocol class to hand uvicorn's Config."""
    return functools.partial(GuardedH11Protocol, guard=guard)
