"""The example service's wire protocol (:mod:`xenheap.tools.serve`): one connection's
requests and replies, carried out on its domain.

A request is one line of ASCII ending in ``\\n`` (``\\r\\n`` also works), at most 1024 bytes;
words are separated by blanks, the command is case-insensitive, numbers are decimal. Every
request gets exactly one reply, in order; a reply is one line, followed by raw bytes only for
READ::

    ALLOC <size>                            -> OK <id> <capacity>
    WRITE <id> <offset> <len>\\n<len bytes>  -> OK
    READ <id> <offset> <len>                -> OK <len>\\n<len bytes>
    FREE <id>                               -> OK
    STATS                                   -> OK <json>
    QUIT                                    -> OK            (then the server closes)

- ALLOC: a fresh buffer from ``Domain.alloc_bytes(size)``; ``size`` is a byte count or a size
  string (``64K``, ``1MiB``). ``capacity`` is the block's size (``size`` rounded up to a
  power-of-two number of pages): the whole of it is the client's and reads zero at first.
  Ids are per connection and never reused.
- WRITE/READ: ``offset + len`` must lie within ``capacity``; ``len`` may be 0.
- STATS: one line of JSON: ``{"domain": {...}, "buffers": n, "dirty_pages": n}`` where
  ``domain`` is ``Domain.stats()`` plus its id, name and ``max_bytes``, and ``dirty_pages`` is
  the heap's (``Heap.stats()["dirty_pages"]``).
- Errors: ``ERR <message>``, one line; nothing changed and the connection stays usable (an
  unknown command, a bad number, no such buffer, out of range, ``OutOfMemory`` for the quota
  or a full heap...). A WRITE refused for its id or range still consumes its payload, so the
  stream stays in step. Only when the stream can no longer be parsed does the server reply
  ``ERR ...`` and close the connection: a line longer than 1024 bytes, or a WRITE whose
  ``<len>`` is missing, not a number, or larger than the heap's largest block.

READ replies are sent straight from the block, with no copy; why that is safe (each
connection's write buffer limit is 0) is in :mod:`xenheap.tools.serve`'s design notes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

from xenheap.errors import InvalidArgument, XenHeapError
from xenheap.sizes import parse_size

if TYPE_CHECKING:
    from xenheap.domain import Block, Domain
    from xenheap.tools.serve import Service

__all__ = ["MAX_LINE", "Connection", "one_line"]

MAX_LINE = 1024
# WRITE payloads are moved in pieces of at most this size, so that a connection never buffers
# more than that much beyond the stream's own limit, whatever length it announces.
_CHUNK = 256 * 1024
_MAX_WORD = 40  # how much of a bad word an error message quotes
_LINGER_S = 1.0  # how long a connection closed for a framing error drains its input
_LINGER_BYTES = 4 * 1024 * 1024


class _Refused(Exception):
    """A request refused with ``ERR``; nothing changed and the connection goes on."""


class _Unframed(Exception):
    """The stream can no longer be parsed: reply ``ERR`` and close the connection."""


def _quote(word: str) -> str:
    # ascii(): replies stay ASCII whatever bytes the request held.
    return ascii(word if len(word) <= _MAX_WORD else word[:_MAX_WORD] + "...")


def _number(word: str, what: str) -> int:
    # int() would also take "+5", " 5" and "5_000"; the protocol says plain decimal digits.
    if not (word.isascii() and word.isdigit()) or len(word) > 19:
        raise _Refused(f"{what} must be a decimal number, got {_quote(word)}")
    return int(word)


def one_line(exc: BaseException) -> str:
    """``"OutOfMemory: ..."``, on one line: an ``ERR`` reply or a log line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class Connection:
    """The per-connection state: its domain and its buffers by id."""

    def __init__(self, service: Service, dom: Domain, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.service = service
        self.heap = service.heap
        self.dom = dom
        self.reader = reader
        self.writer = writer
        self.blocks: dict[int, Block] = {}
        self.next_id = 1

    async def _send(self, line: str) -> None:
        # Replies are ASCII even when they quote a request's odd bytes.
        self.writer.write(line.encode("ascii", "backslashreplace") + b"\n")
        await self.writer.drain()

    async def run(self) -> None:
        """Serve requests until the client leaves, QUITs or breaks the framing."""
        service = self.service
        while True:
            try:
                line = await self.reader.readline()
            except ValueError:  # longer than the stream's limit
                line = b"x" * (MAX_LINE + 1)
            if not line:
                return  # end of stream
            if len(line) > MAX_LINE:
                service.requests += 1
                service.errors += 1
                await self._send(f"ERR request line longer than {MAX_LINE} bytes; closing")
                await self._linger()
                return
            if not line.endswith(b"\n"):
                return  # end of stream in the middle of a line: the client went away
            service.requests += 1
            try:
                if not await self._dispatch(line.decode("latin-1").split()):
                    return
            except _Refused as exc:
                service.errors += 1
                await self._send(f"ERR {exc}")
            except _Unframed as exc:
                service.errors += 1
                await self._send(f"ERR {exc}; closing")
                await self._linger()
                return
            except XenHeapError as exc:
                service.errors += 1
                await self._send(f"ERR {one_line(exc)}")

    async def _linger(self) -> None:
        """Half-close, then drop what the client still sends, for a moment.

        Closing a socket with unread input makes TCP send a reset, and a reset can destroy
        the ERR reply still in flight; so the client gets our FIN first, and its own close
        (or the time limit) ends the connection.
        """
        if self.writer.can_write_eof():
            self.writer.write_eof()

        async def drain_input() -> None:
            left = _LINGER_BYTES
            while left > 0:
                chunk = await self.reader.read(min(left, _CHUNK))
                if not chunk:
                    return
                left -= len(chunk)

        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, ValueError):
            await asyncio.wait_for(drain_input(), _LINGER_S)

    async def _dispatch(self, words: list[str]) -> bool:
        """Carry out one request and reply; False once the connection should end."""
        if not words:
            raise _Refused("empty request")
        command, args = words[0].upper(), words[1:]
        if command == "WRITE":  # first: its payload must be consumed whatever else is wrong
            await self._write(args)
            return True
        expected = {"ALLOC": 1, "READ": 3, "FREE": 1, "STATS": 0, "QUIT": 0}.get(command)
        if expected is None:
            raise _Refused(f"unknown command {_quote(words[0])} "
                           "(ALLOC, WRITE, READ, FREE, STATS, QUIT)")
        if len(args) != expected:
            raise _Refused(f"{command} takes {expected} argument(s), got {len(args)}")
        if command == "ALLOC":
            await self._alloc(args[0])
        elif command == "READ":
            await self._read(args)
        elif command == "FREE":
            ident = _number(args[0], "id")
            self._block(ident).free()
            del self.blocks[ident]
            await self._send("OK")
        elif command == "STATS":
            await self._stats()
        else:  # QUIT
            await self._send("OK")
            return False
        return True

    def _block(self, ident: int) -> Block:
        blk = self.blocks.get(ident)
        if blk is None:
            raise _Refused(f"no buffer {ident} (never allocated, or freed)")
        return blk

    def _span(self, args: list[str]) -> tuple[int, Block, int, int]:
        """(id, block, offset, length) of a READ or WRITE, range-checked."""
        ident = _number(args[0], "id")
        offset = _number(args[1], "offset")
        length = _number(args[2], "len")
        blk = self._block(ident)
        if offset + length > blk.nbytes:
            raise _Refused(f"range [{offset}, {offset + length}) is outside buffer {ident} "
                           f"of {blk.nbytes} bytes")
        return ident, blk, offset, length

    async def _alloc(self, size_word: str) -> None:
        try:
            size = parse_size(size_word, what="size")
        except InvalidArgument as exc:
            raise _Refused(str(exc)) from None
        blk = self.dom.alloc_bytes(size)  # OutOfMemory / InvalidArgument: ERR, nothing changed
        ident = self.next_id
        self.next_id += 1
        self.blocks[ident] = blk
        await self._send(f"OK {ident} {blk.nbytes}")

    async def _write(self, args: list[str]) -> None:
        if len(args) != 3:
            raise _Unframed(f"WRITE takes 3 arguments (id, offset, len), got {len(args)}")
        try:
            length = _number(args[2], "len")
        except _Refused as exc:
            raise _Unframed(str(exc)) from None
        if length > self.service.max_len:
            raise _Unframed(f"len {length} is larger than the largest buffer "
                            f"({self.service.max_len} bytes)")
        try:
            _, blk, offset, _ = self._span(args)
        except _Refused:
            await self._discard(length)
            raise
        with blk.view() as view:
            pos, end = offset, offset + length
            while pos < end:
                chunk = await self.reader.read(min(end - pos, _CHUNK))
                if not chunk:
                    raise ConnectionResetError("end of stream inside a WRITE payload")
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
        await self._send("OK")

    async def _discard(self, length: int) -> None:
        while length:
            chunk = await self.reader.read(min(length, _CHUNK))
            if not chunk:
                raise ConnectionResetError("end of stream inside a WRITE payload")
            length -= len(chunk)

    async def _read(self, args: list[str]) -> None:
        _, blk, offset, length = self._span(args)
        with blk.view() as view, view[offset:offset + length] as part:
            self.writer.write(b"OK %d\n" % length)
            self.writer.write(part)
            # Returns only once the transport holds no reference to ``part`` (limit 0).
            await self.writer.drain()

    async def _stats(self) -> None:
        dom = self.dom
        body = {
            "domain": {"id": dom.id, "name": dom.name, "max_bytes": dom.max_bytes,
                       **dom.stats()},
            "buffers": len(self.blocks),
            "dirty_pages": self.heap.stats()["dirty_pages"],
        }
        await self._send("OK " + json.dumps(body, separators=(",", ":")))
