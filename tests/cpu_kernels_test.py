"""Tests of the CPU kernels' build: cache, failures, reuse.

Their values are tested through the depthwise conv (tests/depthwise_test.py:
'ffi' against XLA's grouped conv, in value and gradient).
"""

import pytest

from dha_jax.nas import cpu_kernels


def test_builds_once_into_the_cache_and_reuses_the_library(monkeypatch,
                                                          tmp_path):
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
  first = cpu_kernels._build(cpu_kernels.DEFAULT_COMPILER)
  assert first.parent == tmp_path and first.suffix == '.so'
  built_at = first.stat().st_mtime_ns
  assert cpu_kernels._build(cpu_kernels.DEFAULT_COMPILER) == first
  assert first.stat().st_mtime_ns == built_at
  assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def test_a_changed_source_builds_a_library_of_its_own(monkeypatch, tmp_path):
  """The digest in the name covers the source: a stale library is never
  loaded for a new source (here: a source that does not compile)."""
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path))
  broken = tmp_path / 'broken.cc'
  broken.write_text('this is not C++\n')
  monkeypatch.setattr(cpu_kernels, 'SOURCE', broken)
  with pytest.raises(cpu_kernels.KernelBuildError, match='failed'):
    cpu_kernels._build(cpu_kernels.DEFAULT_COMPILER)
  # Nothing half-written is left for a later process to load.
  assert [p.name for p in tmp_path.iterdir()] == ['broken.cc']


def test_failures_name_the_problem_and_the_fix(monkeypatch, tmp_path):
  with pytest.raises(cpu_kernels.KernelBuildError, match='C\\+\\+ compiler'):
    cpu_kernels._build(str(tmp_path / 'no-such-compiler'))
  # A cache folder that cannot be made (under a file: even root cannot).
  (tmp_path / 'a_file').write_text('')
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / 'a_file' / 'cache'))
  with pytest.raises(cpu_kernels.KernelBuildError,
                     match=cpu_kernels.CACHE_ENV):
    cpu_kernels._build(cpu_kernels.DEFAULT_COMPILER)


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / 'k'))
  assert cpu_kernels.cache_dir() == tmp_path / 'k'
  monkeypatch.delenv(cpu_kernels.CACHE_ENV)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert cpu_kernels.cache_dir() == tmp_path / 'xdg' / 'dha_jax'


def test_this_machine_builds_them():
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  assert cpu_kernels.unavailable_reason() is None
