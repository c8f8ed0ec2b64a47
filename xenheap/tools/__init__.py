"""xenheap's tools: the ``xenheap`` command (``demo``, ``bench``, ``info``), the measurements
behind it and behind bench/, and an example service. Built on the library, never imported by
it; nothing is imported here, so ``python -m xenheap.tools.busy`` (a measured child) loads
only what it uses.

| module | what it holds |
| --- | --- |
| ``workload`` | the steps every experiment is built from: fill, write, destroy, wait, time |
| ``baselines`` | what xenheap is compared with: libc memset, numpy fill(0), other buffers |
| ``machine`` | the machine: CPU, memory, and what ``xenheap info`` reports |
| ``demo``, ``bench``, ``busy`` | the experiments (``busy`` also runs as the measured child) |
| ``hogs`` | the CPU-bound processes of the busy experiment |
| ``report``, ``plot`` | results as tables, and the bench's plot |
| ``progress`` | live scrub progress on stderr |
| ``cli`` | the ``xenheap`` command: arguments, checks, dispatch, exit statuses |
| ``serve``, ``protocol`` | the example service and its wire protocol |

Every experiment returns a dataclass; ``dataclasses.asdict`` of it is the command's JSON.
"""
