"""The repository stands alone: its documents cite nothing outside it, their links resolve,
and what they state about the code (the frame table's size, the licence) is what the code
says. Cheap: reads files only.
"""

from __future__ import annotations

import os
import re

import pytest

from native_kernels import layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "docs/design.md")
# Sources outside this repository that its text once cited.
OUTSIDE_CITATIONS = ("DESIGN.md", "seed's experiment", "RFC's downside", "../shared/",
                     "shared/DESIGN")
# Where the text the project ships lives.
SCANNED = ("README.md", "docs", "xenheap", "native_kernels", "bench", "tests",
           "pyproject.toml")
XEN_NAMES = ("alloc_heap_pages", "free_heap_pages", "first_dirty", "scrub_state",
             "node_need_scrub", "check_and_stop_scrub", "scrub_free_pages")


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def scanned_files() -> list[str]:
    files = []
    for top in SCANNED:
        full = os.path.join(REPO, top)
        if os.path.isfile(full):
            files.append(top)
            continue
        for root, dirs, names in os.walk(full):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            files += [os.path.relpath(os.path.join(root, n), REPO) for n in names
                      if n.endswith((".py", ".md", ".toml", ".txt"))]
    return sorted(files)


def test_nothing_cites_sources_outside_the_repository() -> None:
    me = os.path.relpath(os.path.abspath(__file__), REPO)
    offenders = []
    for path in scanned_files():
        if path == me:
            continue
        for number, line in enumerate(read(path).splitlines(), start=1):
            offenders += [f"{path}:{number}: {cited}" for cited in OUTSIDE_CITATIONS
                          if cited in line]
    assert not offenders, "\n".join(offenders)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", markdown, re.M)}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_resolve(document: str) -> None:
    text = read(document)
    base = os.path.dirname(document)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(base, path)) if path else document
        assert os.path.exists(os.path.join(REPO, target)), f"{document}: {link}"
        if anchor:
            assert anchor in _anchors(read(target)), f"{document}: {link}: no such heading"


def test_readme_points_to_the_design_and_says_linux_only() -> None:
    readme = read("README.md")
    assert "](docs/design.md)" in readme
    assert "Linux only" in readme
    assert "](LICENSE)" in readme


def test_design_names_the_xen_functions_and_the_real_frame_table_size() -> None:
    design = read("docs/design.md")
    for name in XEN_NAMES:
        assert f"`{name}`" in design, name
    assert layout.FRAME_TABLE_BYTES_PER_PAGE == 24
    assert f"**{layout.FRAME_TABLE_BYTES_PER_PAGE} bytes per page**" in design
    # Every frame-table row the code defines is described, and no other.
    rows = {name for name in vars(layout) if name.startswith("PG_")}
    described = set(re.findall(r"`ft(?:32|8)\[(PG_\w+)\]`", design))
    assert described == rows


def test_license_is_the_mit_license_pyproject_declares() -> None:
    # tomllib is Python 3.11+; the project supports 3.10, so read the one line.
    declared = re.search(r'^license = \{ text = "([^"]+)" \}$', read("pyproject.toml"), re.M)
    assert declared is not None
    text = read("LICENSE")
    assert declared.group(1) == "MIT"
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the xenheap developers" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text
