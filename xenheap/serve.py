"""``python -m xenheap.serve``: the example service, which lives in :mod:`xenheap.tools.serve`."""
from xenheap.tools.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
