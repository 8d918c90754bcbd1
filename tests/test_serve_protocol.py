"""``JoinedWritesTransport``: the writes of one event-loop turn leave as one.

The transport under it is a recording stand-in (a socket transport cannot show how its writes
were grouped); the real server's replies are checked to arrive in one read in test_serve.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from akidb_embed.serve._protocol import JoinedWritesTransport


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def writelines(self, list_of_data: Any) -> None:
        self.sent.append(b"".join(list_of_data))

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


def _joined() -> tuple[RecordingTransport, JoinedWritesTransport]:
    under = RecordingTransport()
    return under, JoinedWritesTransport(under, asyncio.get_running_loop())


def test_head_and_body_written_in_one_turn_leave_as_one_write() -> None:
    async def scenario() -> None:
        under, joined = _joined()
        joined.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
        joined.write(memoryview(b"body"))
        assert under.sent == [] and joined.get_write_buffer_size() == 42
        await asyncio.sleep(0)  # the end of the turn
        assert under.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"]
        joined.write(b"next reply")
        await asyncio.sleep(0)
        assert under.sent[1:] == [b"next reply"]

    asyncio.run(scenario())


def test_close_writes_what_is_held_first_and_abort_drops_it() -> None:
    async def scenario() -> None:
        under, joined = _joined()
        joined.write(b"last reply")
        joined.close()
        assert under.sent == [b"last reply"] and under.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        assert under.sent == [b"last reply"]

        under, joined = _joined()
        joined.write(b"never sent")
        joined.abort()
        await asyncio.sleep(0)
        assert under.sent == [] and under.aborted

    asyncio.run(scenario())
