"""Tests of dha_jax.host_memory: freed memory is reused without page faults."""

import subprocess
import sys
import textwrap

import pytest

from dha_jax import host_memory

# A block as large as the buffers XLA:CPU frees after each step (the
# glibc default serves it with mmap and unmaps it on free).
_BLOCK_BYTES = 256 * 2**20
_PAGE_BYTES = 4096

# Allocates, fills and frees the block twice and prints the page faults of
# the second fill; argv[1] == '1' retains freed memory first.
_SCRIPT = textwrap.dedent(f'''
    import ctypes, ctypes.util, resource, sys
    from dha_jax import host_memory
    if sys.argv[1] == '1':
      assert host_memory.retain_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def fill():
      block = libc.malloc({_BLOCK_BYTES})
      ctypes.memset(block, 1, {_BLOCK_BYTES})
      libc.free(block)
    fill()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def _second_fill_faults(retain: bool) -> int:
  out = subprocess.run([sys.executable, '-c', _SCRIPT, '1' if retain else '0'],
                       check=True, capture_output=True, text=True)
  return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc settings')
def test_a_freed_block_is_reused_without_page_faults():
  pages = _BLOCK_BYTES // _PAGE_BYTES
  # glibc's default: the block is unmapped on free and faulted in anew
  # (huge pages, where the kernel gives them, fault 512 pages at once).
  assert _second_fill_faults(retain=False) > pages // 1024
  assert _second_fill_faults(retain=True) < pages // 1024


def test_returns_false_without_glibc(monkeypatch):
  monkeypatch.setattr(host_memory.ctypes.util, 'find_library', lambda _: None)
  assert not host_memory.retain_freed_memory()
