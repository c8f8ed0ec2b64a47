"""The layout checks itself: native_kernels.layout.check_layout holds for the real layout,
runs at import, and fires, naming the problem, on each kind of broken layout. Also: there
is one PAGE_SIZE, and xenheap refuses to import where the OS pages are another size.
Cheap: no heap, no kernel compiled.
"""

from __future__ import annotations

import importlib.util
import mmap
import re
import sys
from pathlib import Path

import pytest

from native_kernels import layout
from native_kernels.layout_rules import LayoutError, check_layout
from xenheap import prim

LAYOUT_SOURCE = Path(layout.__file__).read_text(encoding="utf-8")


def namespace(**changes: object) -> dict:
    ns = dict(vars(layout))
    ns.update(changes)
    return ns


def test_the_real_layout_passes_its_checks() -> None:
    check_layout(dict(vars(layout)))


def test_derived_counts_keep_their_values() -> None:
    # Kernels and tests index with these; deriving them must not change them.
    assert layout.FT32_FIELDS == 5
    assert layout.FT8_FIELDS == 4
    assert layout.FRAME_TABLE_BYTES_PER_PAGE == 24
    assert layout.NODE_FIELDS == 152
    assert layout.LIST_FIELDS == 3
    assert layout.DOM_FIELDS == 40
    assert layout.META_FIELDS == 24
    assert layout.SLAB_HEADER_BYTES == 64


def test_rows_are_whole_cache_lines() -> None:
    for count in (layout.NODE_FIELDS, layout.DOM_FIELDS, layout.META_FIELDS):
        assert count * 8 % layout.CACHE_LINE_BYTES == 0
    # Rows start on cache lines because the arrays are page-aligned.
    state = layout.new_state(2, 16, 3, zeros=prim.zeroed_array)
    for name in ("nodes", "doms", "meta"):
        array = state[name]
        assert array.ctypes.data % prim.PAGE_SIZE == 0
        if array.ndim == 2:
            assert array.strides[0] % layout.CACHE_LINE_BYTES == 0


def test_the_checks_run_at_import() -> None:
    broken = LAYOUT_SOURCE.replace("DOM_FIELDS = round_to_lines(D_UNPARKED + 1)",
                                   "DOM_FIELDS = 36")
    assert broken != LAYOUT_SOURCE
    with pytest.raises(ImportError, match="DOM_FIELDS"):
        exec(compile(broken, "broken_layout.py", "exec"), {"__name__": "broken_layout"})


# (what is broken, the changes that break it, what the error must say)
BROKEN = [
    ("overlapping node fields", {"N_FREE": 4}, r"N_FREE .* overlaps N_LOCK .* in nodes"),
    ("a wide field overlapping the next", {"D_PARKED_COUNT": 26},
     r"D_PARKED_COUNT .* overlaps D_PARKED .* in doms"),
    ("overlapping ft32 rows", {"PG_TAG": 3}, r"PG_TAG .* overlaps PG_OWNER .* in ft32"),
    ("overlapping meta fields", {"M_PARKS": 16}, r"M_PARKS .* overlaps M_REUSED"),
    ("overlapping list fields", {"L_COUNT": 0}, r"overlaps .* in lists"),
    ("overlapping slab header words", {"SH_PREV": 4}, r"SH_\w+ .* overlaps SH_\w+ .* slab"),
    ("a negative index", {"L_COUNT": -1}, r"L_COUNT = -1 in lists"),
    ("a field past the row", {"D_PARKS": 40}, r"D_PARKS \(words 40\.\.40\) does not fit"),
    ("a histogram past the row", {"ABORT_HIST_BUCKETS": 40},
     r"N_CHARGES \(words 56\.\.151\) overlaps N_ABORT_HIST \(words 24\.\.63\)"),
    ("a row not whole cache lines", {"DOM_FIELDS": 44},
     r"doms rows are 352 bytes .*not whole 64-byte cache lines"),
    ("node rows not whole cache lines", {"NODE_FIELDS": 156}, r"nodes rows are 1248 bytes"),
    ("a count that is not derived", {"DOM_FIELDS": 48},
     r"DOM_FIELDS = 48, but doms's fields need 40"),
    ("a frame-table count that is not derived", {"FT32_FIELDS": 6},
     r"FT32_FIELDS = 6, but ft32's fields need 5"),
    ("a list count that is not derived", {"LIST_FIELDS": 4},
     r"LIST_FIELDS = 4, but lists's fields need 3"),
    ("a slab header that is not whole words", {"SLAB_HEADER_BYTES": 60},
     r"SLAB_HEADER_BYTES = 60 is not a whole number"),
    ("a PG_ row in no array", {"PG_REFCOUNT": 5},
     r"PG_REFCOUNT must be in exactly one of FT32_ROWS and FT8_ROWS"),
    ("a stale frame-table size", {"FRAME_TABLE_BYTES_PER_PAGE": 20},
     r"FRAME_TABLE_BYTES_PER_PAGE = 20, but 5 uint32 and 4 uint8 rows take 24"),
    ("25 bytes a page",
     {"PG_REFCOUNT": 4, "FT8_ROWS": (*layout.FT8_ROWS, "PG_REFCOUNT"), "FT8_FIELDS": 5,
      "FRAME_TABLE_BYTES_PER_PAGE": 25},
     r"the frame table costs 25 bytes a page, not 24"),
    ("more than Xen's 32 bytes a page",
     {"PG_REFCOUNT": 5, "PG_FLAGS": 6, "PG_EXTRA": 7,
      "FT32_ROWS": (*layout.FT32_ROWS, "PG_REFCOUNT", "PG_FLAGS", "PG_EXTRA"),
      "FT32_FIELDS": 8, "FRAME_TABLE_BYTES_PER_PAGE": 36},
     r"36 bytes a page, more than Xen's struct page_info \(32\)"),
    ("a node lock after guarded data", {"N_ADDR": 5, "N_FREE": 2},
     r"N_FREE come\(s\) before N_LOCK; only N_BASE, N_PAGES, N_ADDR may precede"),
    ("a domain lock after its counters", {"D_PAGES": 4, "D_BLOCKS": 5, "D_LOCK": 6},
     r"D_PAGES, D_BLOCKS come\(s\) before D_LOCK"),
    ("a node lock outside the first cache line", {"N_LOCK": 152, "NODE_FIELDS": 160},
     r"N_LOCK \(words 152\.\.153\) is not in its row's first cache line"),
    ("a lock straddling the first line", {"D_LOCK": 7, "D_BLOCKS": 4, "D_MAX_PAGES": 5},
     r"D_LOCK \(words 7\.\.8\) is not in its row's first cache line"),
    ("more nodes than the wake mask", {"MAX_NODES": 65}, r"MAX_NODES = 65: .*one int64"),
    ("first_dirty overflowing uint32", {"MAX_ORDER_LIMIT": 32},
     r"MAX_ORDER_LIMIT = 32: PG_FIRST_DIRTY \(uint32\)"),
    ("an order overflowing uint8", {"MAX_ORDER_LIMIT": 256},
     r"MAX_ORDER_LIMIT = 256 does not fit PG_ORDER \(uint8\)"),
    ("a pinned flag of two bits", {"OWNER_PINNED": 3 << 30},
     r"OWNER_PINNED = 0xc0000000 is not one bit"),
    ("a slab bitmap too small", {"SLAB_BITMAP_WORDS": 3, "SH_BITMAP": 5},
     r"one-page slab holds 252 objects .* has 192 bits"),
    ("a nonzero empty link", {"NIL": 1}, r"NIL = 1: it must be 0"),
    ("a nonzero free state", {"DOM_FREE": 4}, r"DOM_FREE = 4: it must be 0"),
    ("two scrub states equal", {"BUDDY_SCRUB_ABORT": 1},
     r"BUDDY_\w+ and BUDDY_\w+ are both 1"),
    ("a page state beyond uint8", {"PGS_INUSE": 256}, r"PGS_INUSE = 256 does not fit"),
    ("a positive error code", {"E_CLOSED": 7}, r"E_CLOSED = 7: kernel error codes are negative"),
    ("a page size not a power of two", {"PAGE_SIZE": 16384}, r"PAGE_SIZE = 16384 is not"),
    ("a zero-width field", {"LOCK_WORDS": 0}, r"N_LOCK spans LOCK_WORDS = 0 words"),
]


@pytest.mark.parametrize(("changes", "message"), [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_each_check_fires_and_names_the_problem(changes: dict, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        check_layout(namespace(**changes))


def test_layout_error_is_an_import_error() -> None:
    assert issubclass(LayoutError, ImportError)


def test_there_is_one_page_size() -> None:
    assert prim.PAGE_SIZE is layout.PAGE_SIZE
    source = Path(prim.__file__).read_text(encoding="utf-8")
    assert not re.search(r"^PAGE_SIZE\s*=", source, re.M)


def test_prim_refuses_another_os_page_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmap, "PAGESIZE", 16384)
    spec = importlib.util.spec_from_file_location("xenheap_prim_16k", prim.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=re.escape("page size is 16384 bytes")):
        spec.loader.exec_module(module)
    assert "xenheap_prim_16k" not in sys.modules
