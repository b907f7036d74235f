"""Test peers that misbehave on purpose: a raw WebSocket client and a cuttable TCP proxy.

The raw client speaks just enough RFC 6455 to complete a handshake and then lets the test
decide whether it ever reads or answers pings, which a library client does by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from bench._common import websocket_handshake


@dataclass
class Frame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode(errors="replace")

    def json(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.payload)
        return message


class RawClient:
    """A WebSocket client on a plain socket: handshake, then only what the test does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, path_and_query: str, rcvbuf: int | None = None, host: str | None = None
    ) -> RawClient:
        """Complete the opening handshake (see :func:`bench._common.websocket_handshake`);
        ConnectionError with the response head when it is refused."""
        reader, writer, head = await websocket_handshake(
            port, path_and_query, host=host, rcvbuf=rcvbuf
        )
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(head.decode(errors="replace"))
        return cls(reader, writer)

    async def frame(self, timeout_s: float = 10.0) -> Frame | None:
        """The next frame, or None at end of stream."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout_s)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await asyncio.wait_for(self.reader.readexactly(length), timeout_s)
        except asyncio.IncompleteReadError:
            return None
        return Frame(head[0] & 0x0F, payload)

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    def stop_reading(self) -> None:
        """Take nothing more from the socket (not even into this process's buffer)."""
        transport = self.writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.resume_reading()

    def close(self) -> None:
        self.writer.transport.abort()


class TcpProxy:
    """Forwards loopback connections to a port; :meth:`cut` drops every live one."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        self.cuts += 1
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}
