"""A real HTTP server on 127.0.0.1 that answers GET requests with scripted replies.

The download tests point the loader's URL at it, so that pooch's own downloader makes real HTTP
requests: status codes, retries, transfers cut short and the progress bar all happen as they would
against the real server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import threading
from collections.abc import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class Reply:
    """One scripted answer.

    Attributes:
        status: the HTTP status code.
        body: the bytes sent after the headers.
        declared_length: the ``Content-Length`` header (default: the body's length; larger for a
            transfer cut short); ``None`` sends no ``Content-Length``, so the end of the body is
            where the server closes the connection.
    """

    status: int = 200
    body: bytes = b""
    declared_length: int | None = -1

    @property
    def content_length(self) -> int | None:
        return len(self.body) if self.declared_length == -1 else self.declared_length


def cut_short(body: bytes, kept: int, *, declared: bool = True) -> Reply:
    """A transfer of ``body`` that stops after ``kept`` bytes; ``declared``: with a
    ``Content-Length`` of the whole body (which the client can check) or without one."""
    return Reply(body=body[:kept], declared_length=len(body) if declared else None)


class ArchiveServer:
    """Serves :attr:`replies` in order, the last one for every later request; records the paths
    requested in :attr:`requests`. Use :func:`serve` to run one."""

    def __init__(self, replies: Sequence[Reply] = ()) -> None:
        self.replies: list[Reply] = list(replies)
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection, closed after the body

            def do_GET(self) -> None:
                server.requests.append(self.path)
                reply = server._next_reply()
                self.send_response(reply.status)
                if reply.content_length is not None:
                    self.send_header("Content-Length", str(reply.content_length))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the test reads :attr:`ArchiveServer.requests` instead."""

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def url(self, path: str) -> str:
        """The address of ``path`` (``/...``) on this server."""
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}{path}"

    def _next_reply(self) -> Reply:
        if not self.replies:
            return Reply(status=404)
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


@contextlib.contextmanager
def serve(replies: Sequence[Reply] = ()) -> Iterator[ArchiveServer]:
    """Runs an :class:`ArchiveServer` in a thread for the duration of the ``with`` block."""
    server = ArchiveServer(replies)
    thread = threading.Thread(target=server._http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server._http.shutdown()
        server._http.server_close()
        thread.join()
