"""A TCP proxy in front of a real Redis that can drop a connection at a chosen moment.

Clients connect to ``proxy.url``; bytes pass both ways unchanged until the proxy is
armed. Armed with ``cut_answer_to(marker)``, it lets the next command whose bytes hold
``marker`` reach Redis, then closes the connection instead of passing on Redis's answer:
the command ran, its caller never hears so. Armed with ``cut_answer_holding(marker)``, it
closes the connection instead of passing on an answer that holds ``marker``. Each cut
happens once; ``cuts`` counts them.
"""

from __future__ import annotations

import select
import socket
import threading
from urllib.parse import urlparse

__all__ = ["CuttingProxy"]


def _connect_upstream(url: str) -> socket.socket:
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(parsed.path)
    else:
        upstream = socket.create_connection((parsed.hostname, parsed.port or 6379))
    return upstream


class CuttingProxy:
    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.cuts = 0
        self._lock = threading.Lock()
        self._after_command: bytes | None = None
        self._in_answer: bytes | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        parsed = urlparse(upstream_url)
        login = f"{parsed.username or ''}:{parsed.password}@" if parsed.password else ""
        self.url = f"redis://{login}127.0.0.1:{self._listener.getsockname()[1]}/0"
        self._stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_answer_to(self, marker: bytes) -> None:
        with self._lock:
            self._after_command = marker

    def cut_answer_holding(self, marker: bytes) -> None:
        with self._lock:
            self._in_answer = marker

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pass, args=(client, _connect_upstream(self.upstream_url)), daemon=True).start()

    def _pass(self, client: socket.socket, upstream: socket.socket) -> None:
        cut_next_answer = False
        try:
            while not self._stopping.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for side in ready:
                    data = side.recv(65536)
                    if not data:
                        return
                    with self._lock:
                        if side is client:
                            if self._after_command is not None and self._after_command in data:
                                self._after_command, cut_next_answer = None, True
                            upstream.sendall(data)
                            continue
                        if cut_next_answer or (self._in_answer is not None and self._in_answer in data):
                            if not cut_next_answer:
                                self._in_answer = None
                            self.cuts += 1
                            return  # the answer is dropped with the connection
                    client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
