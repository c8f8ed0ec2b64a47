"""An example service: tenants keep bytes in xenheap buffers over TCP, one domain per connection.

Command line::

    python -m xenheap.tools.serve [--host 127.0.0.1] [--port 0] [--size 256MiB] [--nodes N]
                                  [--quota SIZE] [--scrub idle|sync|alloc] [--log-level INFO]

It prints ``listening on HOST:PORT`` on stdout once it accepts connections (``--port 0``
picks a free port), logs to stderr, and runs until SIGINT or SIGTERM; then it closes every
connection, destroys their domains, runs ``Heap.check()`` and exits 0 (1 if the check
fails). It listens on loopback only: any ``--host`` that is not a loopback IP address
(``0.0.0.0``, ``::``, a LAN address, even the name ``localhost``, which is not resolved) is
refused with a one-line error and exit status 2. It is an example, not a hardened server:
there is no authentication, only the loopback restriction.

Embedding::

    heap = xenheap.Heap("256MiB")
    service = await xenheap.tools.serve.serve(heap, "127.0.0.1", 0, quota="16MiB")
    print(service.port)
    ...
    service.close()
    await service.wait_closed()   # every connection's domain is destroyed by now
    heap.close()

Each connection is a domain named ``conn-N`` (with ``max_bytes=quota`` if a quota is set).
The domain is destroyed when the connection ends, however it ends (QUIT, close, reset, a
protocol error, the service closing): its buffers go back to the heap dirty, and the
scrubbers zero them before anyone else can be given them.

The protocol (ALLOC, WRITE, READ, FREE, STATS, QUIT) is in :mod:`xenheap.tools.protocol`.

Design notes
------------
- The heap work runs in the event loop's thread, inline. Every call is a nogil numba kernel
  that returns in microseconds (measured on the 2-core development machine, under load from
  other jobs: 17-33 us to allocate a 64 KiB to 1 MiB block, 0.45 ms for 16 MiB and 1.6 ms for
  128 MiB taken dirty and scrubbed on allocation, 0.1 ms to destroy a domain), while a hop to
  a thread pool and back cost 67 us; only ``--scrub sync`` (zero on free and destroy) makes a
  call take long enough to be worth moving off the loop.
- Bytes move through ``Block.view()`` memoryviews. READ replies are sent straight from the
  block (no copy in Python); WRITE payloads are copied once, from the stream's buffer into the
  block. A transport may keep a reference to a buffer it could not send at once (CPython
  3.12+ keeps the memoryview itself), and the block could meanwhile be freed, scrubbed and
  given to another tenant. So each connection's write buffer limit is 0: after a READ the
  handler waits until the socket has taken every byte before it reads the next request, and a
  connection that ends with bytes still queued is aborted, dropping them, before its domain
  is destroyed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import logging
import signal
import sys
from collections.abc import Sequence

from xenheap.domain import Domain
from xenheap.errors import HeapCorruption, InvalidArgument, XenHeapError
from xenheap.heap import SCRUB_MODES, Heap
from xenheap.sizes import parse_size
from xenheap.tools.protocol import MAX_LINE, Connection, one_line

__all__ = ["MAX_LINE", "NotLoopback", "Service", "check_loopback", "main", "serve"]

log = logging.getLogger("xenheap.serve")  # the same name however it is run


class NotLoopback(ValueError):
    """The service was asked to listen on an address that is not loopback."""


def check_loopback(host: str) -> None:
    """Raise NotLoopback unless ``host`` is a loopback IP address (127.0.0.0/8 or ::1).

    Names are refused rather than resolved: a name can resolve beyond loopback.
    """
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise NotLoopback(
            f"refusing to listen on {host!r}: give a loopback IP address such as 127.0.0.1 "
            "(this example service never listens beyond loopback)"
        ) from None
    if not addr.is_loopback:
        raise NotLoopback(
            f"refusing to listen on {host}: not a loopback address "
            "(this example service never listens beyond loopback)"
        )


class Service:
    """A running example service (see the module docstring): ``serve()`` returns one.

    Like ``asyncio.Server``: ``close()``, ``wait_closed()``, ``serve_forever()``, ``sockets``,
    and an async context manager; in addition ``close()`` ends the live connections too.
    Counters: ``connections`` (accepted so far), ``requests``, ``errors`` (ERR replies),
    ``live`` (connections open now).
    """

    def __init__(self, heap: Heap, quota: int | None) -> None:
        self.heap = heap
        self.quota = quota
        self.connections = 0
        self.requests = 0
        self.errors = 0
        self._numbers = itertools.count(1)
        self._live: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._server: asyncio.Server | None = None
        # The largest WRITE that can succeed: a longer one is a framing error.
        self.max_len = heap.page_size << heap.max_order

    # --- asyncio.Server-like face ----------------------------------------------------------
    @property
    def server(self) -> asyncio.Server:
        """The underlying asyncio.Server."""
        assert self._server is not None
        return self._server

    @property
    def sockets(self) -> tuple:
        """The listening sockets."""
        return tuple(self.server.sockets)

    @property
    def host(self) -> str:
        """The address it listens on."""
        return str(self.sockets[0].getsockname()[0])

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS picked, for port 0)."""
        return int(self.sockets[0].getsockname()[1])

    @property
    def live(self) -> int:
        """Connections open now."""
        return len(self._live)

    def writers(self) -> list[asyncio.StreamWriter]:
        """The live connections' stream writers (a copy)."""
        return list(self._live.values())

    def close(self) -> None:
        """Stop listening and end every live connection (their handlers destroy the domains)."""
        self.server.close()
        for writer in self.writers():
            # abort, not close: drops queued reply bytes, which may point into a block.
            writer.transport.abort()

    async def wait_closed(self) -> None:
        """Wait until close() is done: no connection left, every domain destroyed."""
        if self._live:
            await asyncio.gather(*self._live, return_exceptions=True)
        await self.server.wait_closed()

    async def serve_forever(self) -> None:
        """Accept connections until cancelled (or closed)."""
        await self.server.serve_forever()

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def stats(self) -> dict[str, int]:
        """The counters as a dict."""
        return {"connections": self.connections, "live": self.live,
                "requests": self.requests, "errors": self.errors}

    # --- one connection --------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._live[task] = writer
        self.connections += 1
        name = f"conn-{next(self._numbers)}"
        # Zero-copy READ replies need an empty write buffer before the next request (see the
        # module docstring): with a high-water mark of 0, drain() waits until it is empty.
        writer.transport.set_write_buffer_limits(high=0)
        dom: Domain | None = None
        try:
            try:
                dom = self.heap.create_domain(name=name, max_bytes=self.quota)
            except XenHeapError as exc:
                log.warning("%s refused: %s", name, exc)
                self.errors += 1
                writer.write(f"ERR {one_line(exc)}\n".encode())
                await writer.drain()
                return
            log.debug("%s from %s: domain %d", name, writer.get_extra_info("peername"), dom.id)
            await Connection(self, dom, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("%s dropped: %s", name, one_line(exc))
        except Exception:
            log.exception("%s failed", name)
        finally:
            transport = writer.transport
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
            if dom is not None and dom.alive:
                try:
                    dom.destroy()
                except XenHeapError as exc:  # the heap was closed under us
                    log.warning("%s: could not destroy its domain: %s", name, exc)
            del self._live[task]
            log.debug("%s closed", name)


async def serve(heap: Heap, host: str = "127.0.0.1", port: int = 0, *,
                quota: int | str | None = None) -> Service:
    """Start the example service on ``heap`` and return it, listening (see the module docstring).

    ``host`` must be a loopback IP address (NotLoopback, a ValueError, otherwise); ``quota``
    caps each connection's domain (``max_bytes``). Must be awaited in the loop that will run
    it; the heap stays the caller's to close, after the service.
    """
    check_loopback(host)
    max_bytes = None
    if quota is not None:
        max_bytes = parse_size(quota, what="quota")
        if max_bytes == 0:
            raise InvalidArgument("quota must be positive (or None for no quota)")
    service = Service(heap, max_bytes)
    server = await asyncio.start_server(service._handle, host, port)
    service._server = server
    # Defence in depth: whatever getaddrinfo made of ``host``, listen on loopback only.
    for sock in server.sockets:
        bound = sock.getsockname()[0]
        if not ipaddress.ip_address(bound).is_loopback:
            server.close()
            raise NotLoopback(f"{host!r} was bound to {bound}, which is not loopback")
    log.info("xenheap example service on %s:%d (heap %d pages, quota %s)",
             service.host, service.port, heap.total_pages, max_bytes)
    return service


# --- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xenheap.tools.serve",
        description="Example xenheap service: each TCP connection is a domain that can store "
                    "bytes in heap buffers (protocol: see xenheap.tools.protocol). Loopback only.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="loopback address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port; 0 picks a free one (default 0)")
    parser.add_argument("--size", default="256MiB", help="heap size (default 256MiB)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="emulate this many NUMA nodes (default: the machine's)")
    parser.add_argument("--quota", default=None,
                        help="max bytes each connection may hold (default: no quota)")
    parser.add_argument("--scrub", choices=sorted(SCRUB_MODES), default="idle",
                        help="scrub mode of the heap (default idle)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level on stderr (default INFO)")
    return parser


async def _run(heap: Heap, args: argparse.Namespace) -> int:
    try:
        service = await serve(heap, args.host, args.port, quota=args.quota)
    except OSError as exc:
        print(f"xenheap.serve: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1
    host = f"[{service.host}]" if ":" in service.host else service.host
    print(f"listening on {host}:{service.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    service.close()
    await service.wait_closed()
    st = heap.stats()
    try:
        heap.check()
    except HeapCorruption as exc:
        log.error("heap check failed: %s", exc)
        return 1
    log.info("stopped: %d connections, %d requests, %d errors; %d domains left, "
             "%d dirty pages; heap check passed", service.connections, service.requests,
             service.errors, st["domains"], st["dirty_pages"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example service from the command line; returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the signal handlers were in place (setup, the heap)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_loopback(args.host)
        if args.quota is not None and parse_size(args.quota, what="--quota") == 0:
            raise InvalidArgument("--quota must be positive")
        if not 0 <= args.port <= 65535:
            raise InvalidArgument(f"--port must be 0..65535, got {args.port}")
    except (NotLoopback, InvalidArgument) as exc:
        print(f"xenheap.serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        heap = Heap(size=args.size, nodes=args.nodes, scrub=args.scrub)
    except XenHeapError as exc:
        print(f"xenheap.serve: error: {exc}", file=sys.stderr)
        return 2
    with heap:
        return asyncio.run(_run(heap, args))


if __name__ == "__main__":
    sys.exit(main())
