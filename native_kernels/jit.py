"""How a kernel is compiled: the option sets of the kernels that only other kernels call
(:data:`INTERNAL`) and of the few inlined into their callers (:data:`INLINE`), and the
outlined twins of those (:func:`outlined`).

Every kernel is ``@njit(nogil=True, cache=True)``. For each function it compiles, numba also
builds two wrappers, one that CPython calls through and one with the C ABI (a cfunc), and
optimises and emits each as an LLVM module of its own: a fifth of a cold start's compile
time went to them. Most kernels are only ever called by other kernels, which call the
compiled function itself, so they are compiled with :data:`INTERNAL`, without wrappers.

numba still lets Python call such a kernel, through a null pointer, and the process dies.
``tests/test_layout.py`` checks that no module outside ``native_kernels`` (the library,
the tests, the benchmarks) names one.
"""

from numba import njit
from numba.core.dispatcher import Dispatcher

INTERNAL = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}

# Inlined into their callers by numba (at its IR level): the numpy handler's paths for each
# small array and for the parked blocks of arrays of a few pages. LLVM does not inline a
# function that takes several arrays, each passed as seven or more words, and on those
# paths the calls cost more than the work: a malloc and free of 1,000 small arrays took
# 69-85 ns an array through the calls, 44-66 ns inlined.
INLINE = {"inline": "always"}


def outlined(kernel: Dispatcher) -> Dispatcher:
    """A twin of the :data:`INLINE` ``kernel``, compiled as a function of its own, for its
    callers off numpy's hot path (the slow paths behind a slab or parked-block miss, realloc).

    numba inlines such a kernel by copying and typing its code again in every caller, and a
    cold start spent seconds on those copies in the slow paths, where a call costs nothing
    next to the work. The twin has the kernel's options but the inlining, and its code.
    """
    options = {key: value for key, value in kernel.targetoptions.items()
               if key in ("nogil", "_nrt", "no_cpython_wrapper", "no_cfunc_wrapper")}
    return njit(cache=True, **options)(kernel.py_func)
