"""uvicorn's HTTP protocol with each reply leaving the server in one write.

uvicorn writes a reply's status line and headers on ``http.response.start`` and its body on
``http.response.body``: two writes on the transport, each sent at once (the socket has
TCP_NODELAY), so two TCP segments. A caller woken by the first reads the headers, then sleeps
again until the body comes: one more wake-up on most replies. Measured on the 2-core VM with
http.client as the caller, 258 of 300 one-sentence replies took two reads; joined, every one
took one (docs/performance.md, "Over HTTP", has what it did to a lone query's time).

``OneWriteHttpProtocol`` is uvicorn's own protocol (httptools where installed, else h11) whose
transport holds the writes made during one turn of the event loop and writes them as one at
the end of the turn (``loop.call_soon``), or as soon as uvicorn says the reply is complete: the
app sends its two messages without yielding, so a reply is one write. Closing, or writing EOF,
writes what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as UvicornHttpProtocol
except ImportError:  # no httptools (the serve extra installs it): uvicorn's h11 parser
    from uvicorn.protocols.http.h11_impl import (  # type: ignore[assignment]
        H11Protocol as UvicornHttpProtocol,
    )

__all__ = ["JoinedWritesTransport", "OneWriteHttpProtocol"]


class JoinedWritesTransport(asyncio.Transport):
    """``transport`` with the writes of one event-loop turn joined into one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Write what is held now (a no-op when nothing is, or the connection is closing)."""
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.writelines(held)  # uvloop: one writev; asyncio: joined, one send

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


class OneWriteHttpProtocol(UvicornHttpProtocol):
    """uvicorn's HTTP/1.1 protocol on a ``JoinedWritesTransport``."""

    transport: JoinedWritesTransport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(JoinedWritesTransport(transport, asyncio.get_running_loop()))

    def on_response_complete(self) -> None:
        self.transport.flush()  # the reply is whole: out now, not at the end of the turn
        super().on_response_complete()
