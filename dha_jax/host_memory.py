"""Keep freed host memory in the process, so that XLA:CPU's step buffers are
not mapped and page-faulted in anew on every step.

XLA:CPU allocates a step's temporary buffer with `malloc` and frees it when
the step ends; for the DARTS search step of the speed comparison (5 cells,
C = 8, batch 96) that buffer is 558 MB, plus buffers of 39-79 MB inside the
step. glibc serves blocks this large with `mmap` and gives them back with
`munmap` (and threads other than the main one allocate from arenas of at
most 64 MiB, which cannot hold them either), so every step maps fresh zero
pages and takes a page fault per 4 KiB: about 146,000 faults per step, a
quarter of its time on the development CPU (experiments/RESULTS.md, 'Step
time against the official code').

`retain_freed_memory` sets three glibc `malloc` parameters so that the first
step's memory is reused by every later one: one arena for all threads, no
`mmap`ed blocks (everything comes from the heap), and no trimming of the
heap's free top. The process then keeps its peak host memory until it
exits, which is what a training process does anyway. It must run before
JAX starts its CPU backend (whose threads pick their arena on their first
allocation); the benchmarks call it first thing, `dha_jax.main` with
`--retain_host_memory`. The cost: with one arena, XLA's compiler threads
contend for malloc's lock, and compilation on several threads is 3-4x
slower (the README's default job: its first step compiled in 197-211 s
instead of 55 s), so `dha_jax.main` leaves it off by default.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): keep up to 2 GiB of
# free heap top instead of the default 128 KiB.
_NEVER_TRIM_BYTES = 2**31 - 1


def retain_freed_memory() -> bool:
  """Configures glibc's malloc to keep and reuse freed memory (see the module
  docstring). Returns whether it applied: False where the C library is not
  glibc (macOS, musl), which is left as it is."""
  name = ctypes.util.find_library('c')
  if name is None:
    return False
  libc = ctypes.CDLL(name)
  if not hasattr(libc, 'gnu_get_libc_version') or not hasattr(libc,
                                                               'mallopt'):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
              (_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
