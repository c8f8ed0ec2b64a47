"""How a kernel is compiled: the option sets of the kernels that only other kernels call
(:data:`INTERNAL`) and of the few inlined into their callers (:data:`INLINE`).

Every kernel is ``@njit(nogil=True, cache=True)``. For each function it compiles, numba also
builds two wrappers, one that CPython calls through and one with the C ABI (a cfunc), and
optimises and emits each as an LLVM module of its own: a fifth of a cold start's compile
time went to them. Most kernels are only ever called by other kernels, which call the
compiled function itself, so they are compiled with :data:`INTERNAL`, without wrappers.

numba still lets Python call such a kernel, through a null pointer, and the process dies.
``tests/test_layout.py`` checks that no module outside ``native_kernels`` (the library,
the tests, the benchmarks) names one.
"""

INTERNAL = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}

# Inlined into their callers by numba (at its IR level): the numpy handler's paths for each
# small array and for the parked blocks of arrays of a few pages. LLVM does not inline a
# function that takes several arrays, each passed as seven or more words, and on those
# paths the calls cost more than the work: a malloc and free of 1,000 small arrays took
# 69-85 ns an array through the calls, 44-66 ns inlined.
INLINE = {"inline": "always"}
