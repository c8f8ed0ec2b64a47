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
"""

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_ORDER_LIMIT = 20  # Xen's MAX_ORDER: chunks of up to 4 GiB
MAX_NODES = 64  # the scrubber wake-up mask is one int64
NIL = 0
INVALID_DIRTY_IDX = 0

# --- ft32 rows -------------------------------------------------------------------------
PG_NEXT = 0  # link to the next chunk/block on whichever list holds it (free list or domain's)
PG_PREV = 1  # link to the previous one
PG_FIRST_DIRTY = 2  # free chunk head: first possibly-dirty page; a lower bound. Atomic while
#                     the chunk is BUDDY_SCRUBBING (the scrubber records its progress here).
PG_OWNER = 3  # allocated block head: owning domain slot + 1, with OWNER_PINNED set while
#               numpy arrays use the block (it then outlives a destroy); 0 elsewhere. Atomic.
PG_TAG = 4  # allocated block head: allocation tag, so a stale handle is told from a new block.
FT32_FIELDS = 5

# --- ft8 rows --------------------------------------------------------------------------
PG_STATE = 0  # every page: PGS_FREE (inside a free chunk) or PGS_INUSE (inside a block)
PG_ORDER = 1  # chunk or block head: its order
PG_NEED_SCRUB = 2  # every page: 1 = dirty. Authoritative. Cleared without the lock only by
#                    whoever holds the chunk exclusively (a scrubber while BUDDY_SCRUBBING, an
#                    allocator after taking the block); the abort handshake orders the rest.
PG_SCRUB_STATE = 3  # free chunk head: BUDDY_NOT_SCRUBBING / _SCRUBBING / _SCRUB_ABORT. Atomic.
FT8_FIELDS = 4

PGS_FREE = 0
PGS_INUSE = 1

BUDDY_NOT_SCRUBBING = 0  # Xen's names, as in page_alloc.c
BUDDY_SCRUBBING = 1  # a scrubber zeroes this chunk without the lock
BUDDY_SCRUB_ABORT = 2  # an allocator holding the lock wants it; the scrubber must let go

OWNER_PINNED = 1 << 31

FRAME_TABLE_BYTES_PER_PAGE = FT32_FIELDS * 4 + FT8_FIELDS

# --- nodes: int64[nr_nodes, NODE_FIELDS], one row per node (own cache lines) -----------------
N_BASE = 0  # first mfn of the node
N_PAGES = 1  # pages in the node
N_ADDR = 2  # arena start address
N_LOCK = 3  # heap lock: ticket "next" at N_LOCK, "owner" at N_LOCK + 1. Atomic.
N_FREE = 5  # free pages (on the free lists). Atomic.
N_NEED_SCRUB = 6  # Xen's node_need_scrub: pages with need_scrub inside free chunks. Atomic.
N_TAG = 7  # allocation tag counter (under the lock)
N_SCRUBBED = 8  # pages zeroed by the background scrubber. Atomic.
N_ALLOC_SCRUBBED = 9  # pages zeroed by an allocator (scrub-on-allocate). Atomic.
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
N_ABORT_HIST = 24  # 32 buckets: abort waits by floor(log2(ns)). Atomic.
ABORT_HIST_BUCKETS = 32
NODE_FIELDS = N_ABORT_HIST + ABORT_HIST_BUCKETS

# --- lists: int64[nr_nodes, MAX_ORDER_LIMIT + 1, LIST_FIELDS] (under the node lock) --------
L_HEAD = 0  # first chunk (clean ones come first), mfn + 1
L_TAIL = 1  # last chunk (dirty ones come last), mfn + 1
L_COUNT = 2  # chunks on the list; read without the lock for statistics. Atomic.
LIST_FIELDS = 3

# --- domains: int64[max_domains, DOM_FIELDS], one row per slot -----------------------------
D_ID = 0  # the domain's unique id; 0 = slot unused
D_STATE = 1  # DOM_* below. Atomic.
D_HEAD = 2  # block list, mfn + 1 (under the domain lock)
D_TAIL = 3
D_LOCK = 4  # the domain's page_alloc_lock: ticket next/owner at D_LOCK, D_LOCK + 1. Atomic.
D_PAGES = 6  # pages held. Atomic.
D_BLOCKS = 7  # blocks held. Atomic.
D_MAX_PAGES = 8  # quota in pages; 0 = none
D_PEAK = 9  # most pages ever held at once. Atomic.
D_ALLOCS = 10  # blocks allocated. Atomic.
D_FREES = 11  # blocks freed (by free or destroy). Atomic.
D_NUMPY_PAGES = 12  # pages in blocks pinned by numpy arrays (slabs included). Atomic.
D_SLABS = 16  # SLAB_CLASSES heads of the lists of slabs with a free object (under the lock)
DOM_FIELDS = 24

DOM_FREE = 0
DOM_ALIVE = 1
DOM_DYING = 2  # destroyed, but numpy arrays still use some of its blocks
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
META_FIELDS = 16

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
SLAB_HEADER_BYTES = 64
SH_CLASS = 0  # size class + 1
SH_USED = 1  # objects handed out
SH_NEXT = 2  # next slab with a free object, mfn + 1
SH_PREV = 3
SH_BITMAP = 4  # 4 words: bit i set = object i in use (at most 252 objects a slab)

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
