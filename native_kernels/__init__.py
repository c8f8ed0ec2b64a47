"""The jitted core of xenheap: every state change of the heap happens in these kernels.

All functions here are numba ``@njit(nogil=True, cache=True)`` code over numpy arrays and raw
arena addresses; no Python object crosses into them, so any number of threads run them at once.

numba's on-disk cache notices a change to a kernel's own file but not to the kernels it
calls from other files, and would keep running the old callees. The package's sources are
stamped instead: when any of them changes, the package's cached kernels are dropped.
"""

import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _drop_stale_cache() -> None:
    sources = sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    try:
        from numba.core.caching import CacheImpl

        # Every module of this package lives in one folder, so they share one cache folder;
        # ask numba's own locators where that is (in-tree, NUMBA_CACHE_DIR, user-wide).
        locator = next(filter(None, (cls.from_function(_drop_stale_cache, __file__)
                                     for cls in CacheImpl._locator_classes)))
        cache_dir = Path(locator.get_cache_path())
        stamp = cache_dir / "native_kernels.sources.sha256"
        if stamp.is_file() and stamp.read_text() == digest:
            return
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*cache_dir.glob("*.nbi"), *cache_dir.glob("*.nbc")]:
            stale.unlink(missing_ok=True)
        stamp.write_text(digest)
    except (AttributeError, ImportError, OSError, RuntimeError, StopIteration) as exc:
        log.warning("cannot check numba's cache for stale kernels (%s); after editing "
                    "native_kernels/, clear its cache by hand", exc)


_drop_stale_cache()
