"""The rules native_kernels.layout checks at import (``check_layout(globals())``).

They read the layout from a namespace, so that tests can break one value in a copy: every
field in one group, distinct, inside its rows and counted by a derived ``*_FIELDS``; rows
of whole cache lines where the layout says so; 24 bytes of frame table a page; locks in
their row's first cache line, after only the fields allowed; the limits the field types
impose; codes told apart, and zero meaning "nothing".
"""


class LayoutError(ImportError):
    """The layout breaks one of its own rules (raised at import, like C's ``#error``)."""


def _fields(ns: dict, spec: str) -> list[str]:
    """The field names of a group: a tuple named ``spec``, or every int named ``spec*``."""
    if not spec.endswith("_"):
        return list(ns[spec])
    return sorted((k for k, v in ns.items() if k.startswith(spec) and type(v) is int),
                  key=lambda k: ns[k])


def _width(ns: dict, field: str) -> int:
    widths = ns["FIELD_WIDTHS"]
    width = ns[widths[field]] if field in widths else 1
    if type(width) is not int or width < 1:
        raise LayoutError(f"{field} spans {widths[field]} = {width!r} words; "
                          "a field spans at least one")
    return width


def _check_group(ns: dict, array: str, spec: str, count_name: str, lines: bool) -> None:
    names = _fields(ns, spec)
    count = ns[count_name]
    if count_name.endswith("_BYTES"):
        if count % 8:
            raise LayoutError(f"{count_name} = {count} is not a whole number of int64 words")
        count //= 8
    spans = []
    for name in names:
        first = ns[name]
        if type(first) is not int or first < 0:
            raise LayoutError(f"{name} = {first!r} in {array}: a field index is an int >= 0")
        end = first + _width(ns, name)
        for other, o_first, o_end in spans:
            if first < o_end and o_first < end:
                raise LayoutError(f"{name} (words {first}..{end - 1}) overlaps {other} "
                                  f"(words {o_first}..{o_end - 1}) in {array}")
        if end > count:
            raise LayoutError(f"{name} (words {first}..{end - 1}) does not fit {array}'s "
                              f"{count_name} = {ns[count_name]}")
        spans.append((name, first, end))
    need = max(end for _, _, end in spans)
    if lines:
        if (count * 8) % ns["CACHE_LINE_BYTES"]:
            raise LayoutError(f"{array} rows are {count * 8} bytes ({count_name} = "
                              f"{ns[count_name]}): not whole {ns['CACHE_LINE_BYTES']}-byte "
                              "cache lines, so rows would share lines")
        need = -(-need // ns["LINE_WORDS"]) * ns["LINE_WORDS"]
    if count != need:
        unit = " words" if count_name.endswith("_BYTES") else ""
        raise LayoutError(f"{count_name} = {ns[count_name]}, but {array}'s fields need "
                          f"{need}{unit}{' (whole cache lines)' if lines else ''}: derive it "
                          "from the last field, do not write a literal")


def check_layout(ns: dict) -> None:
    """Raise LayoutError naming the first rule that the layout in namespace ``ns`` breaks.

    Called at import with this module's ``globals()``; tests pass a copy with one value
    broken.
    """
    if ns["PAGE_SIZE"] != 1 << ns["PAGE_SHIFT"]:
        raise LayoutError(f"PAGE_SIZE = {ns['PAGE_SIZE']} is not 1 << PAGE_SHIFT "
                          f"({1 << ns['PAGE_SHIFT']})")
    if ns["LINE_WORDS"] * 8 != ns["CACHE_LINE_BYTES"]:
        raise LayoutError(f"LINE_WORDS = {ns['LINE_WORDS']} int64 do not make a "
                          f"{ns['CACHE_LINE_BYTES']}-byte cache line")

    # Every field in one group, and each group's fields distinct, inside its rows, and
    # counted by a derived *_FIELDS.
    frame_rows = set(ns["FT32_ROWS"]) | set(ns["FT8_ROWS"])
    for name in sorted(k for k in ns if k.startswith("PG_")):
        if (name in ns["FT32_ROWS"]) == (name in ns["FT8_ROWS"]):
            raise LayoutError(f"{name} must be in exactly one of FT32_ROWS and FT8_ROWS")
    undefined = sorted(frame_rows - set(ns))
    if undefined:
        raise LayoutError(f"{', '.join(undefined)} listed as frame-table rows, not defined")
    for group in ns["FIELD_GROUPS"]:
        _check_group(ns, *group)
    for field in ns["FIELD_WIDTHS"]:
        if field not in ns:
            raise LayoutError(f"FIELD_WIDTHS names {field}, which is not defined")

    # The frame table: 24 bytes a page, never more than Xen's struct page_info.
    cost = ns["FT32_FIELDS"] * 4 + ns["FT8_FIELDS"]
    if ns["FRAME_TABLE_BYTES_PER_PAGE"] != cost:
        raise LayoutError(f"FRAME_TABLE_BYTES_PER_PAGE = {ns['FRAME_TABLE_BYTES_PER_PAGE']}, "
                          f"but {ns['FT32_FIELDS']} uint32 and {ns['FT8_FIELDS']} uint8 rows "
                          f"take {cost}")
    if cost > ns["XEN_PAGE_INFO_BYTES"]:
        raise LayoutError(f"the frame table costs {cost} bytes a page, more than Xen's "
                          f"struct page_info ({ns['XEN_PAGE_INFO_BYTES']})")
    if cost != ns["FRAME_TABLE_BUDGET"]:
        raise LayoutError(f"the frame table costs {cost} bytes a page, not "
                          f"{ns['FRAME_TABLE_BUDGET']} (docs/design.md says "
                          f"{ns['FRAME_TABLE_BUDGET']}: change both, knowingly)")

    # Locks come first: in the row's first cache line, after only the fields allowed.
    for lock, allowed in ns["LOCK_PRECEDED_BY"].items():
        first = ns[lock]
        end = first + _width(ns, lock)
        if end > ns["LINE_WORDS"]:
            raise LayoutError(f"{lock} (words {first}..{end - 1}) is not in its row's first "
                              f"cache line (words 0..{ns['LINE_WORDS'] - 1})")
        prefix = lock.split("_")[0] + "_"
        early = [k for k in _fields(ns, prefix) if ns[k] < first and k not in allowed]
        if early:
            raise LayoutError(f"{', '.join(early)} come(s) before {lock}; only "
                              f"{', '.join(allowed)} may precede the lock")

    # Limits that types impose.
    if not 1 <= ns["MAX_NODES"] <= 64:
        raise LayoutError(f"MAX_NODES = {ns['MAX_NODES']}: the scrubber wake-up mask is one "
                          "int64, so 1 to 64 nodes")
    max_order = ns["MAX_ORDER_LIMIT"]
    if not 0 <= max_order <= 0xFF:
        raise LayoutError(f"MAX_ORDER_LIMIT = {max_order} does not fit PG_ORDER (uint8)")
    if (1 << max_order) > 0xFFFF_FFFF:
        raise LayoutError(f"MAX_ORDER_LIMIT = {max_order}: PG_FIRST_DIRTY (uint32) holds "
                          "offset + 1, up to 2**MAX_ORDER_LIMIT, so at most 31")
    pinned = ns["OWNER_PINNED"]
    if not 0 < pinned <= 0xFFFF_FFFF or pinned & (pinned - 1):
        raise LayoutError(f"OWNER_PINNED = {pinned:#x} is not one bit of PG_OWNER (uint32)")
    objects = (ns["PAGE_SIZE"] - ns["SLAB_HEADER_BYTES"]) // ns["SLAB_MIN_OBJECT"]
    if objects > 64 * ns["SLAB_BITMAP_WORDS"]:
        raise LayoutError(f"a one-page slab holds {objects} objects of SLAB_MIN_OBJECT bytes "
                          f"but its bitmap (SLAB_BITMAP_WORDS = {ns['SLAB_BITMAP_WORDS']}) "
                          f"has {64 * ns['SLAB_BITMAP_WORDS']} bits")

    # Codes: an all-zero array is a valid state, and no two codes of a kind are equal.
    for name in ns["ZERO_ENCODINGS"]:
        if ns[name] != 0:
            raise LayoutError(f"{name} = {ns[name]}: it must be 0, so that an all-zero state "
                              "array is a valid, empty heap")
    for prefix, in_uint8 in ns["ENUMS"]:
        codes = {k: v for k, v in ns.items() if k.startswith(prefix) and type(v) is int
                 and not k.endswith("_FIELDS")}
        seen: dict[int, str] = {}
        for name, value in sorted(codes.items(), key=lambda kv: kv[1]):
            if value in seen:
                raise LayoutError(f"{name} and {seen[value]} are both {value}")
            if in_uint8 and not 0 <= value <= 0xFF:
                raise LayoutError(f"{name} = {value} does not fit the frame table's uint8")
            if prefix == "E_" and value >= 0:
                raise LayoutError(f"{name} = {value}: kernel error codes are negative")
            seen[value] = name
