"""Connection hardening on a real loopback server (tiny random model): hundreds of idle and slow-header
connections do not lock out a normal client, the caps close idle connections before refusing anyone, and a
refused newcomer gets 503 with Retry-After."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from llama3.serve.app import BackgroundServer, ServeConfig, create_app

from test_serve_engine import tiny_llama

pytestmark = pytest.mark.timeout(120)


def connect_from(address: str, server: BackgroundServer) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, 0))  # any 127.x.y.z is this machine: a distinct client address without a network
    sock.settimeout(5)
    sock.connect((server.host, server.port))
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Attackers:
    """`idle` connections that never send a byte and `slow` ones that send one header line every 2 s, each
    reopened at once whenever the server closes it, on a thread, until stopped."""

    def __init__(self, server, *, idle: tuple[str, int], slow: tuple[str, int]):
        self.server, self.idle, self.slow = server, idle, slow
        self.reopened = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, address: str, dripping: bool) -> socket.socket:
        sock = connect_from(address, self.server)
        if dripping:
            sock.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        return sock

    def _run(self) -> None:
        socks = [(self._open(a, d), a, d) for (a, n), d in ((self.idle, False), (self.slow, True)) for _ in range(n)]
        next_drip = time.monotonic() + 2
        while not self.stopping.wait(0.2):
            drip = time.monotonic() > next_drip
            next_drip += 2 * drip
            for i, (sock, address, dripping) in enumerate(socks):
                if closed_by_server(sock):
                    sock.close()
                    socks[i] = (self._open(address, dripping), address, dripping)
                    self.reopened += 1
                elif dripping and drip:
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                    except OSError:
                        pass
        for sock, _, _ in socks:
            sock.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)


def test_idle_and_slow_connections_do_not_lock_out_a_normal_client():
    llm = tiny_llama()
    config = ServeConfig(max_context=256, header_timeout=3)  # the default caps: 1024 in all, 128 per client
    expected = llm.complete_ids([llm.encode_prompt("hello")], max_new_tokens=4)[0]
    with BackgroundServer(create_app(llm, config)) as server:
        # 150 silent connections from another address, 150 slow-header ones from the normal client's own address.
        with Attackers(server, idle=("127.0.0.2", 150), slow=("127.0.0.1", 150)) as attack:
            time.sleep(1)
            deadline = time.monotonic() + 12
            answered = 0
            while time.monotonic() < deadline:
                with httpx.Client(base_url=server.url, timeout=5) as client:  # a fresh connection every time
                    assert client.get("/health").status_code == 200
                    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4,
                                                             "temperature": 0})
                    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
                answered += 1
                time.sleep(0.3)
            assert answered >= 10
            assert attack.reopened > 150  # the caps and the header deadline really closed attack connections


def test_caps_close_idle_connections_first_and_refuse_with_retry_after():
    llm = tiny_llama()
    config = ServeConfig(max_context=256, header_timeout=30, max_connections=10, max_client_connections=4)
    with BackgroundServer(create_app(llm, config)) as server:
        idle = [connect_from("127.0.0.4", server) for _ in range(4)]
        time.sleep(1.5)  # past the grace period of new connections
        newer = connect_from("127.0.0.4", server)  # the fifth: the longest idle one makes room
        time.sleep(0.5)
        assert closed_by_server(idle[0]) and not any(closed_by_server(s) for s in idle[1:] + [newer])
        # Four busy connections (their request headers arrived, the body has not): nothing idle to close.
        busy = [connect_from("127.0.0.5", server) for _ in range(4)]
        for sock in busy:
            sock.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        refused = connect_from("127.0.0.5", server)
        refused.setblocking(True)
        refused.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = refused.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
        assert not any(closed_by_server(s) for s in busy)  # clients being served are never cut off
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # other clients are unaffected
        # The total cap (10): 4 + 4 held, a ninth and a tenth from new addresses, then an eleventh closes the
        # longest idle connection of anyone.
        others = [connect_from(f"127.0.0.{i}", server) for i in (6, 7)]
        time.sleep(0.2)
        assert not closed_by_server(idle[1])
        others.append(connect_from("127.0.0.8", server))
        time.sleep(0.5)
        assert closed_by_server(idle[1]) and not any(closed_by_server(s) for s in busy + others)
        for sock in [*idle, newer, *busy, refused, *others]:
            sock.close()
