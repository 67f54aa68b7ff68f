"""A TCP proxy in front of a real Redis that can drop a connection at a chosen moment.

Clients connect to ``proxy.url``; bytes pass both ways unchanged until the proxy is
armed. Armed with ``cut_answer_to(marker)``, it lets the next command whose bytes hold
``marker`` reach Redis, then closes the connection instead of passing on Redis's answer:
the command ran, its caller never hears so. Armed with ``cut_answer_holding(marker)``, it
closes the connection instead of passing on an answer that holds ``marker``. Each cut
happens once; ``cuts`` counts them. ``go_down()`` plays Redis stopping: every open
connection is closed and each new one is closed as it is accepted, until ``come_back()``.
``go_silent()`` plays a host that stops answering (a firewall dropping packets, a machine
gone): connections stay open, new ones are accepted, and not a byte comes back.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
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
        self._down = False
        self._silent = False
        self._open: set[socket.socket] = set()
        self._unanswered: list[socket.socket] = []  # accepted while silent
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

    def go_down(self) -> None:
        """Close every connection, and each new one as it comes, until ``come_back``."""
        with self._lock:
            self._down = True
            for side in self._open:  # its thread sees the end, and closes it
                with contextlib.suppress(OSError):
                    side.shutdown(socket.SHUT_RDWR)

    def go_silent(self) -> None:
        """Answer nothing from now on, on open connections and new ones, until ``come_back``."""
        with self._lock:
            self._silent = True

    def come_back(self) -> None:
        with self._lock:
            self._down = self._silent = False
            self._close_unanswered()

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            self._close_unanswered()

    def _close_unanswered(self) -> None:
        for client in self._unanswered:
            client.close()
        self._unanswered.clear()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down, silent = self._down, self._silent
                if silent:
                    self._unanswered.append(client)
                    continue
            if down:
                client.close()
                continue
            try:
                upstream = _connect_upstream(self.upstream_url)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pass, args=(client, upstream), daemon=True).start()

    def _pass(self, client: socket.socket, upstream: socket.socket) -> None:
        cut_next_answer = False
        try:
            while not self._stopping.is_set():
                if self._silent:  # what either side sends waits, unread
                    time.sleep(0.05)
                    continue
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
            with self._lock:
                self._open.difference_update((client, upstream))
            client.close()
            upstream.close()
