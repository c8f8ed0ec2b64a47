"""The heap's state, field by field: the frame table and the per-node, per-list, per-domain rows.

This module is the "types header" of xenheap. All heap state lives in these numpy arrays
(struct-of-arrays), so the kernels run without the GIL and an all-zero array is a valid
initial state: ``numpy.zeros`` is lazy, and a heap of any size starts by touching only the
chunk heads it links. Fields read or written by a thread that does not hold the node's heap
lock are marked *atomic*: they are only ever accessed through ``native_kernels.atomics``.

Encodings that make zero mean "nothing":
- a page link or list end holds ``mfn + 1``; ``NIL`` (0) is the empty link;
- ``first_dirty`` holds ``offset + 1`` within the chunk; ``INVALID_DIRTY_IDX`` (0) = all clean.

Frame table ``ft32``: uint32[FT32_FIELDS, nr_pages]; ``ft8``: uint8[FT8_FIELDS, nr_pages].
Together 24 bytes per 4 KiB page (Xen's ``struct page_info`` is 32).

Rows and cache lines. A node's row and a domain's row are whole 64-byte cache lines
(NODE_FIELDS and DOM_FIELDS are multiples of LINE_WORDS), and the heap makes every state
array page-aligned (xenheap.prim.zeroed_array), so each row starts on a cache line of its
own: one node's or domain's lock and counters never share a line with another's.

Locks come first. In a row with a lock (N_LOCK, D_LOCK), "before the data it guards" means:
the lock's two words lie in the row's first cache line, and the only fields at lower
indices are those LOCK_PRECEDED_BY names for it: the node's geometry (N_BASE, N_PAGES,
N_ADDR: written before any thread runs, read-only afterwards), and the domain's identity
(D_ID, D_STATE: read without the lock) and block-list ends (D_HEAD, D_TAIL: guarded by the
lock, and in its cache line, so taking the lock brings them along). Every other field,
guarded or atomic, comes after the lock.

Field counts are derived, never literal: each ``*_FIELDS`` is the end of its group's last
field (index + width), rounded up to whole cache lines for the nodes, domains and meta rows.

The layout checks itself: ``check_layout(globals())`` at the bottom of this file runs at
import and raises LayoutError (an ImportError) naming the first broken rule, as a C
header's ``#error`` would. The rules are in native_kernels/layout_rules.py, the tables they
read (FIELD_GROUPS and the rest) at the end of this file; tests/test_layout.py breaks each
rule once.
"""

from typing import NamedTuple

import numpy as np

from native_kernels.layout_rules import check_layout

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_ORDER_LIMIT = 20  # Xen's MAX_ORDER: chunks of up to 4 GiB
MAX_NODES = 64  # the scrubber wake-up mask is one int64
NIL = 0
INVALID_DIRTY_IDX = 0
CACHE_LINE_BYTES = 64
LINE_WORDS = CACHE_LINE_BYTES // 8  # int64 fields in a cache line
LOCK_WORDS = 2  # a ticket lock (native_kernels.locks): "next" at the field, "owner" after it
XEN_PAGE_INFO_BYTES = 32  # Xen's struct page_info (x86_64): the frame table costs less


def round_to_lines(words: int) -> int:
    """``words`` int64 fields rounded up to whole cache lines."""
    return -(-words // LINE_WORDS) * LINE_WORDS


# --- the life of a chunk: 2^order free or allocated pages, described by its head page -----
#
#  state      PG_STATE   PG_NEED_SCRUB      PG_FIRST_DIRTY     PG_SCRUB_STATE       on list
#  clean      PGS_FREE   0 on every page    INVALID_DIRTY_IDX  BUDDY_NOT_SCRUBBING  free, head
#  dirty      PGS_FREE   1 on some, none    offset + 1 of the  BUDDY_NOT_SCRUBBING  free, tail
#                        before first_dirty first maybe-dirty
#  scrubbing  PGS_FREE   cleared as zeroed  the scrubber's     BUDDY_SCRUBBING      free (stays)
#  abort      PGS_FREE   as scrubbing       progress (atomic)  BUDDY_SCRUB_ABORT    free (stays)
#  in use     PGS_INUSE  0 on every page    -                  -                    domain's
#                        (the allocator zeroes a dirty block before handing it out)
#
#  from -> to               who
#  in use -> dirty          free_heap_pages: a free or a destroy ("sync" mode zeroes: -> clean)
#  dirty -> scrubbing       scrub_free_pages picks the dirty chunk at a list tail (node lock)
#  scrubbing -> clean       scrub_free_pages zeroed it all, takes the lock, moves it to the head
#  scrubbing -> dirty       scrub_free_pages ran out of budget: records progress in first_dirty
#  scrubbing -> abort       check_and_stop_scrub: a lock holder (alloc, merging free, checker)
#                           wants the chunk, CASes the state and waits
#  abort -> dirty           scrub_free_pages notices after its granule, records progress, lets
#                           go (never back to scrubbing); check_and_stop_scrub then has it
#  clean, dirty -> in use   alloc_heap_pages (pass 1 clean, pass 2 dirty); zeroes the dirty
#                           pages after dropping the lock, before the domain gets the block
#  clean, dirty -> merged   free_heap_pages, when the buddy is freed (first_dirty combined)
#  clean -> clean           release_unused: claimed (marked in use), madvised, freed back
#
# A parked numpy block (D_PARKED below) is "in use": on its domain's list, owner unpinned.

# --- ft32 rows -------------------------------------------------------------------------
PG_NEXT = 0  # link to the next chunk/block on whichever list holds it (free list or domain's)
PG_PREV = 1  # link to the previous one
PG_FIRST_DIRTY = 2  # free chunk head: first possibly-dirty page; a lower bound. Atomic while
#                     the chunk is BUDDY_SCRUBBING (the scrubber records its progress here).
PG_OWNER = 3  # allocated block head: owning domain slot + 1, with OWNER_PINNED set while
#               numpy arrays use the block (it then outlives a destroy); 0 elsewhere. Atomic.
PG_TAG = 4  # allocated block head: allocation tag, so a stale handle is told from a new block,
#             with TAG_SLAB set while numpy uses the block as a slab. Free chunk head: whose
#             dirt the chunk holds, charged for scrubbing it (xenheap.charges): one domain id
#             (0: none) for all its dirty pages, or, with TAG_MIXED set, "each dirty page
#             names its own dirtier here" (the head's own in the low bits). A free writes the
#             head only; merging two chunks dirtied by different domains writes the pages of
#             each (once: then the chunk is mixed).
TAG_MIXED = 0x8000_0000  # PG_TAG of a free chunk head: per-page dirtiers; ids fit 31 bits
TAG_SLAB = 0x8000_0000  # PG_TAG of a block head in use: numpy's slab (small.py), whose page
#                         address no free of a whole block may name
TAG_MASK = 0x7FFF_FFFF  # allocation tags and dirtier ids
FT32_FIELDS = PG_TAG + 1  # 5
FT32_ROWS = ("PG_NEXT", "PG_PREV", "PG_FIRST_DIRTY", "PG_OWNER", "PG_TAG")

# --- ft8 rows --------------------------------------------------------------------------
PG_STATE = 0  # every page: PGS_FREE (inside a free chunk) or PGS_INUSE (inside a block)
PG_ORDER = 1  # chunk or block head: its order
PG_NEED_SCRUB = 2  # every page: 1 = dirty. Authoritative. Cleared without the lock only by
#                    whoever holds the chunk exclusively (a scrubber while BUDDY_SCRUBBING, an
#                    allocator after taking the block); the abort handshake orders the rest.
PG_SCRUB_STATE = 3  # free chunk head: BUDDY_NOT_SCRUBBING / _SCRUBBING / _SCRUB_ABORT. Atomic.
FT8_FIELDS = PG_SCRUB_STATE + 1  # 4
FT8_ROWS = ("PG_STATE", "PG_ORDER", "PG_NEED_SCRUB", "PG_SCRUB_STATE")

PGS_FREE = 0
PGS_INUSE = 1

BUDDY_NOT_SCRUBBING = 0  # Xen's names, as in page_alloc.c
BUDDY_SCRUBBING = 1  # a scrubber zeroes this chunk without the lock
BUDDY_SCRUB_ABORT = 2  # an allocator holding the lock wants it; the scrubber must let go

OWNER_PINNED = 1 << 31

FRAME_TABLE_BYTES_PER_PAGE = FT32_FIELDS * 4 + FT8_FIELDS

# --- nodes: int64[nr_nodes, NODE_FIELDS], one row per node (own cache lines) -----------------
N_BASE = 0  # first mfn of the node (N_BASE..N_ADDR: set before any thread runs, read-only)
N_PAGES = 1  # pages in the node
N_ADDR = 2  # arena start address
N_LOCK = 3  # heap lock, LOCK_WORDS: ticket "next" at N_LOCK, "owner" at N_LOCK + 1. Guards
#             the node's free lists (``lists``), N_TAG, the frame table of its free chunks
#             and the charge slots (N_CHARGES); the first field after the read-only ones.
#             Atomic.
N_FREE = 5  # free pages (on the free lists). Atomic.
N_NEED_SCRUB = 6  # Xen's node_need_scrub: pages with need_scrub inside free chunks. Atomic.
N_TAG = 7  # allocation tag counter (under the lock)
N_SCRUBBED = 8  # pages zeroed by the background scrubber (not those dropped). Atomic.
N_ALLOC_SCRUBBED = 9  # pages zeroed by an allocator (scrub-on-allocate, not dropped). Atomic.
N_SYNC_SCRUBBED = 10  # pages zeroed on the free path in "sync" mode. Atomic.
N_ABORTS = 11  # scrubs stopped by check_and_stop_scrub. Atomic.
N_SCRUB_NS = 12  # nanoseconds the scrubber spent zeroing. Atomic.
N_ABORT_WAIT_NS = 13  # total nanoseconds allocators waited in the abort handshake. Atomic.
N_ABORT_WAIT_MAX_NS = 14  # longest such wait. Atomic.
N_ALLOCS = 15  # blocks allocated from this node. Atomic.
N_FREES = 16  # blocks freed to this node. Atomic.
N_SCRUB_PASSES = 17  # chunks the scrubber finished and moved to the head as clean. Atomic.
N_RELEASED = 18  # pages given back to the OS by release_unused (cumulative). Atomic.
N_SCRUBBING = 19  # Xen's node_scrubbing: 1 while a scrubber works on the node. Atomic.
N_DIRTY_SINCE_NS = 20  # CLOCK_MONOTONIC ns when N_NEED_SCRUB last rose from 0: the node has
#                        held dirty pages since (the scrub deadline counts from it). Atomic.
N_UNMAPPED = 21  # dirty pages made clean by MADV_DONTNEED, not zeroing: they were not in
#                  RAM, so writing them would only have faulted them in. Atomic.
N_CHARGE_LOST_PAGES = 22  # allocators' scrub work whose domain found no CHARGE_SLOTS slot
N_CHARGE_LOST_NS = 23  # (pages, ns). Atomic.
N_ABORT_HIST = 24  # 32 buckets: abort waits by floor(log2(ns)). Atomic.
ABORT_HIST_BUCKETS = 32
# Scrub-on-allocate work charged to the domains that dirtied the pages: CHARGE_SLOTS slots
# of CHARGE_WORDS words, (domain id, pages zeroed, ns spent), a slot per domain found by
# probing from id % CHARGE_SLOTS. Claimed, added to, drained into the Python-side totals
# and freed (xenheap.charges) under the node's lock; read atomically.
N_CHARGES = 56
CHARGE_SLOTS = 32
CHARGE_WORDS = 3
CH_ID = 0
CH_PAGES = 1
CH_NS = 2
CHARGE_SPAN = CHARGE_SLOTS * CHARGE_WORDS
NODE_FIELDS = round_to_lines(N_CHARGES + CHARGE_SLOTS * CHARGE_WORDS)  # 152: 19 lines

# --- lists: int64[nr_nodes, MAX_ORDER_LIMIT + 1, LIST_FIELDS] (under the node lock) --------
L_HEAD = 0  # first chunk (clean ones come first), mfn + 1
L_TAIL = 1  # last chunk (dirty ones come last), mfn + 1
L_COUNT = 2  # chunks on the list; read without the lock for statistics. Atomic.
LIST_FIELDS = L_COUNT + 1  # 3

# --- domains: int64[max_domains, DOM_FIELDS], one row per slot (own cache lines) -----------
D_ID = 0  # the domain's unique id; 0 = slot unused
D_STATE = 1  # DOM_* below. Atomic.
D_HEAD = 2  # block list, mfn + 1 (under the domain lock)
D_TAIL = 3
D_LOCK = 4  # the domain's page_alloc_lock, LOCK_WORDS: ticket next/owner at D_LOCK, D_LOCK + 1.
#             Guards D_HEAD/D_TAIL (before it, in its cache line) and the list fields after
#             it (slabs, parked stacks). Atomic.
D_PAGES = 6  # pages held. Atomic.
D_BLOCKS = 7  # blocks held. Atomic.
D_MAX_PAGES = 8  # quota in pages; 0 = none
D_PEAK = 9  # most pages ever held at once. Atomic.
D_ALLOCS = 10  # blocks allocated. Atomic.
D_FREES = 11  # blocks freed (by free or destroy). Atomic.
D_NUMPY_PAGES = 12  # pages in blocks pinned by numpy arrays (slabs included). Atomic.
D_TOTAL_PAGES = 13  # pages ever allocated to the domain (cumulative). Atomic.
D_DIRTIED_PAGES = 14  # pages the domain gave back dirty (cumulative): its scrub bill. Atomic.
D_RELINQUISH = 15  # 1 from a deferred destroy until relinquish_memory has freed the blocks
#                    no numpy array pins (under the lock; read atomically outside it)
D_SLABS = 16  # SLAB_CLASSES heads of the lists of slabs with a free object (under the lock)
D_PARKED = 24  # NUMPY_PARK_ORDERS heads (mfn + 1) of the stacks of blocks numpy freed that
#                the domain keeps for its next arrays, by order (under the lock); a parked
#                block stays on the domain's list, unpinned, and holds the next link in its
#                first 8 bytes
D_PARKED_COUNT = 28  # NUMPY_PARK_ORDERS counts of those stacks (under the lock)
D_PARKED_NS = 32  # CLOCK_MONOTONIC ns of the last park: idle stacks go back to the heap
D_REUSED = 33  # parked blocks taken back for new arrays. Atomic.
D_REUSED_PAGES = 34  # their pages. Atomic.
D_PARKS = 35  # blocks numpy freed that were parked. Atomic.
D_UNPARKED = 36  # parked blocks that went on to the heap (flush, destroy): D_FREES counts
#                  them again, so the statistics take them out. Atomic.
DOM_FIELDS = round_to_lines(D_UNPARKED + 1)  # 40: 5 cache lines

NUMPY_PARK_ORDERS = 4  # numpy blocks of up to 32 KiB are parked for reuse
NUMPY_PARK_MAX = 16  # at most this many of numpy's freed blocks (one-page slabs included)
#                      per order and domain
# ... and up to this many emptied slabs of more than a page (native_kernels.small), on the
# same stacks: a stack that slabs filled past NUMPY_PARK_MAX takes no array block of that
# order until it shrinks.
SLAB_PARK_MAX = 64

# --- the life of a domain (D_STATE) --------------------------------------------------------
#
#  from -> to               who
#  DOM_FREE -> DOM_ALIVE    open_domain, in a never-used slot (all-zero row)
#  DOM_DEAD -> DOM_ALIVE    open_domain, reusing the slot (a new D_ID; old handles refused)
#  DOM_ALIVE -> DOM_DYING   destroy_domain (Xen's domain_kill), under D_LOCK: forgets the
#                           parked stacks and sets D_RELINQUISH; the blocks stay on the list
#  DOM_ALIVE -> DOM_DEAD    destroy_domain, when the domain holds no block
#  DOM_DYING -> DOM_DEAD    relinquish_memory, which frees every unpinned block (parked ones
#                           included) and clears D_RELINQUISH, when no numpy array pinned a
#                           block; else free_pinned_block, when numpy frees the last one
#
# relinquish_memory runs in the destroy itself ("sync" and debug modes, or no scrubber
# running), else soon after it: in the first scrubber's chore, in any caller of the heap's
# statistics, check() or wait_clean(), and in an allocator that finds the heap short.
# Only DOM_ALIVE allocates and frees with free(); numpy's frees of pinned blocks also work
# while DOM_DYING. Parked blocks (D_PARKED) stay on the domain's list, unpinned, in use.
DOM_FREE = 0
DOM_ALIVE = 1
DOM_DYING = 2  # destroyed; its memory waits for relinquish_memory or numpy's frees
DOM_DEAD = 3

# --- meta: int64[META_FIELDS], read-only after creation ------------------------------------
M_NR_PAGES = 0
M_NR_NODES = 1
M_PAGES_PER_NODE = 2
M_MAX_ORDER = 3
M_MODE = 4  # MODE_* below
M_DEBUG = 5  # 1: SCRUB_DEBUG pattern fill/check and poisoning
M_MAX_DOMAINS = 6
M_FAULT = 7  # fault injection for tests: FAULT_* below; 0 = off. Atomic (set at run time).
M_FAULT_ARG = 8  # its argument (pages, microseconds or blocks). Atomic.
M_CLOSED = 9  # 1 once Heap.close() began: calls and numpy callbacks refuse. Atomic.
M_IN_FLIGHT = 10  # API calls running in kernels (native_kernels.api). Atomic.
M_BAD_ARRAY_FREES = 11  # numpy frees of memory this heap did not give out (counted, as a
#                         C callback cannot raise). Atomic.
M_FORKED = 12  # 1 in a forked child's copy: numpy frees of inherited arrays do nothing
#                (a lock may have been held at the fork). Atomic.
M_USED_PAGES = 13  # pages in blocks held by domains, heap-wide. Atomic.
M_PEAK_PAGES = 14  # the most M_USED_PAGES ever was. Atomic.
M_TOTAL_PAGES = 15  # pages ever handed to domains, parked numpy blocks taken back included.
#                    Atomic.
M_REUSED = 16  # parked numpy blocks taken back for new arrays (native_kernels.parked). Atomic.
M_PARKS = 17  # blocks numpy freed that were parked instead of freed. Atomic.
M_REUSE = 18  # 1: domains keep their freed blocks for reuse (Heap reuse_bytes > 0, and neither
#               "sync" nor debug mode, where a free must write the memory)
M_UNPARKED = 19  # D_UNPARKED, heap-wide. Atomic.
M_RELINQUISH = 20  # destroyed domains whose relinquish_memory has not finished (D_RELINQUISH
#                    set, or running): an allocator that finds the heap short relinquishes
#                    them itself, and wait_clean() waits for them. Atomic.
META_FIELDS = round_to_lines(M_RELINQUISH + 1)  # 24: 3 cache lines

FAULT_NONE = 0
FAULT_SCRUB_FAIL = 1  # the scrubber gives up after M_FAULT_ARG pages of a chunk and fails
FAULT_SCRUB_STALL = 2  # the scrubber stalls M_FAULT_ARG us holding a chunk, deaf to aborts
FAULT_POPULATE_FAIL = 3  # populate runs dry after M_FAULT_ARG blocks

MODE_IDLE = 0
MODE_SYNC = 1
MODE_ALLOC = 2

# --- small objects (numpy arrays under a page): slabs of one size class ---------------------
# Class c holds objects of SLAB_MIN_OBJECT << c bytes in a slab block of order
# max(0, c - 4), so that every class fits at least 15 objects. A slab starts with a
# header of SLAB_HEADER_BYTES: uint64 words SH_* below.
SLAB_CLASSES = 8
SLAB_MIN_OBJECT = 16
SLAB_MAX_OBJECT = SLAB_MIN_OBJECT << (SLAB_CLASSES - 1)  # 2048
SH_CLASS = 0  # SLAB_MAGIC << 8 | (size class + 1)
# Above the class byte of a slab's first word: a free names a slab only if the magic is
# there, so a block that stopped being one (parked, its first word now a link, or taken for
# an array and written) makes a stale free fail instead of reading array bytes as a header.
SLAB_MAGIC = 0x58454E534C4142  # "XENSLAB"
SH_USED = 1  # objects handed out
SH_NEXT = 2  # next slab with a free object, mfn + 1
SH_PREV = 3
SH_BITMAP = 4  # SLAB_BITMAP_WORDS: bit i set = object i in use (at most 252 objects a slab)
SLAB_BITMAP_WORDS = 4
SLAB_HEADER_BYTES = round_to_lines(SH_BITMAP + SLAB_BITMAP_WORDS) * 8  # 64: one cache line

SCRUB_PATTERN = 0xC2  # Xen's SCRUB_PATTERN byte
POISON_PATTERN = 0x3D  # ~SCRUB_PATTERN: what a freed page holds in debug mode

# --- kernel return codes (negative; >= 0 is a result) ------------------------------------
E_NOMEM = -1
E_DEAD = -2  # domain destroyed or not this domain
E_BAD_FREE = -3  # not a block of this domain (double free, foreign, stale)
E_CORRUPT = -4  # a debug-mode allocation found a page without the scrub pattern
E_QUOTA = -5  # the domain's quota would be exceeded
E_FAULT = -6  # an injected fault fired
E_CLOSED = -7  # the heap is closed


class HeapState(NamedTuple):
    """The heap's state arrays as one value: the first argument of every kernel that works
    on more than a few of them, as CPython's obmalloc passes ``OMState *state`` and mimalloc
    a ``mi_heap_t *``. Between compiled kernels it costs nothing (numba passes the arrays
    inside); the kernels Python calls often take the arrays one by one and build it, as
    unpacking a tuple of arrays from Python costs about a microsecond a call."""

    ft32: np.ndarray  # uint32[FT32_FIELDS, nr_pages]: the frame table's 32-bit rows
    ft8: np.ndarray  # uint8[FT8_FIELDS, nr_pages]: its 8-bit rows
    nodes: np.ndarray  # int64[nr_nodes, NODE_FIELDS]
    lists: np.ndarray  # int64[nr_nodes, MAX_ORDER_LIMIT + 1, LIST_FIELDS]
    doms: np.ndarray  # int64[max_domains, DOM_FIELDS]
    meta: np.ndarray  # int64[META_FIELDS]
    zone: np.ndarray  # int64[nr_nodes, nr_nodes]: each node's fallback order, itself first


def new_state(nr_nodes: int, pages_per_node: int, max_domains: int,
              zeros=np.zeros) -> dict[str, np.ndarray]:
    """Zeroed state arrays for a heap, made by ``zeros(shape, dtype)``: the heap passes one
    that maps them lazily in 4 KiB pages (xenheap.prim.zeroed_array), so a heap of any
    size costs only the chunk heads it links."""
    nr_pages = nr_nodes * pages_per_node
    return {
        "ft32": zeros((FT32_FIELDS, nr_pages), np.uint32),
        "ft8": zeros((FT8_FIELDS, nr_pages), np.uint8),
        "nodes": zeros((nr_nodes, NODE_FIELDS), np.int64),
        "lists": zeros((nr_nodes, MAX_ORDER_LIMIT + 1, LIST_FIELDS), np.int64),
        "doms": zeros((max_domains, DOM_FIELDS), np.int64),
        "zone": zeros((nr_nodes, nr_nodes), np.int64),
        "meta": zeros(META_FIELDS, np.int64),
    }


# --- the layout checks itself ------------------------------------------------------------
# Field groups: (array, its fields: a tuple of names, or every name with this prefix, the
# count of fields its rows hold, True if its rows are whole cache lines).
FIELD_GROUPS = (
    ("ft32", "FT32_ROWS", "FT32_FIELDS", False),
    ("ft8", "FT8_ROWS", "FT8_FIELDS", False),
    ("nodes", "N_", "NODE_FIELDS", True),
    ("lists", "L_", "LIST_FIELDS", False),
    ("doms", "D_", "DOM_FIELDS", True),
    ("meta", "M_", "META_FIELDS", True),
    ("slab header", "SH_", "SLAB_HEADER_BYTES", True),  # counted in bytes, not words
)
# Fields that span more than one word: field -> the constant that says how many.
FIELD_WIDTHS = {
    "N_LOCK": "LOCK_WORDS",
    "N_ABORT_HIST": "ABORT_HIST_BUCKETS",
    "N_CHARGES": "CHARGE_SPAN",
    "D_LOCK": "LOCK_WORDS",
    "D_SLABS": "SLAB_CLASSES",
    "D_PARKED": "NUMPY_PARK_ORDERS",
    "D_PARKED_COUNT": "NUMPY_PARK_ORDERS",
    "SH_BITMAP": "SLAB_BITMAP_WORDS",
}
# The only fields a row may hold before its lock (see "Locks come first" above).
LOCK_PRECEDED_BY = {
    "N_LOCK": ("N_BASE", "N_PAGES", "N_ADDR"),
    "D_LOCK": ("D_ID", "D_STATE", "D_HEAD", "D_TAIL"),
}
# Values stored in the frame table's uint8 rows, and other codes that must be told apart.
ENUMS = (("PGS_", True), ("BUDDY_", True), ("DOM_", False), ("MODE_", False),
         ("FAULT_", False), ("E_", False))
# What an all-zero state array means: the encodings that make zero "nothing".
ZERO_ENCODINGS = ("NIL", "INVALID_DIRTY_IDX", "PGS_FREE", "BUDDY_NOT_SCRUBBING", "DOM_FREE")
FRAME_TABLE_BUDGET = 24  # bytes a page: what docs/design.md promises


check_layout(globals())
