"""The exceptions xenheap raises; every one derives from :class:`XenHeapError`."""


class XenHeapError(Exception):
    """Base class of every xenheap error."""


class OutOfMemory(XenHeapError, MemoryError):
    """No free chunk (or quota) is large enough for the request, or every domain slot is in
    use (create_domain); nothing was changed."""


class InvalidArgument(XenHeapError, ValueError):
    """A bad order, size, node, dtype or option; nothing was changed."""


class InvalidFree(XenHeapError, ValueError):
    """A double free, a block of another or a destroyed domain, or a stale handle."""


class DomainDead(XenHeapError):
    """The domain was destroyed; it cannot allocate any more."""


class HeapClosed(XenHeapError):
    """The heap was closed (or this is a forked child, where a parent thread may hold its
    locks); it makes no more calls. Its memory stays mapped only while views of it live."""


class HeapCorruption(XenHeapError):
    """An invariant of the heap does not hold; the message names the first broken one."""


class ReleaseFailed(XenHeapError):
    """The OS refused to take memory back (release_unused); every chunk is free again.

    ``released_bytes``: what was given back before the refusal.
    """

    def __init__(self, message: str, released_bytes: int) -> None:
        super().__init__(message)
        self.released_bytes = released_bytes
