"""A server that speaks enough of Redis's protocol to say it is an old Redis (6.0, or 5.x,
which has no HELLO and quotes the greeting back, password and all)."""

from __future__ import annotations

import socket
import threading

__all__ = ["OldRedis"]


class OldRedis:
    """Answers HELLO and INFO with ``version``, PING with PONG, and OK to anything else, on a real socket."""

    def __init__(self, version: str = "6.0.16") -> None:
        self.version = version
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while header := reader.readline():
                words = []
                for _ in range(int(header[1:])):
                    size = int(reader.readline()[1:])
                    words.append(reader.read(size + 2)[:-2])
                if words and words[0].upper() == b"INFO":
                    body = f"# Server\r\nredis_version:{self.version}\r\n".encode()
                    conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                elif words and words[0].upper() == b"HELLO" and int(self.version.split(".")[0]) < 6:
                    quoted = b"".join(b"`%s`, " % word for word in words[1:])  # as Redis 5 words it
                    conn.sendall(b"-ERR unknown command `%s`, with args beginning with: %s\r\n" % (words[0], quoted))
                elif words and words[0].upper() == b"HELLO":  # RESP3, as Redis 6 speaks it
                    version = self.version.encode()
                    conn.sendall(b"%%2\r\n+proto\r\n:3\r\n+version\r\n$%d\r\n%s\r\n" % (len(version), version))
                elif words and words[0].upper() == b"PING":
                    conn.sendall(b"+PONG\r\n")
                else:
                    conn.sendall(b"+OK\r\n")
