"""Tests of the CPU kernels' build (cache, failures, reuse) and of the shapes
their wrappers accept.

Their values are tested through the depthwise conv (tests/depthwise_test.py:
'ffi' against XLA's grouped conv, in value and gradient).
"""

import jax
import jax.numpy as jnp
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


def _f32(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


_X, _DW = _f32(2, 6, 6, 4), _f32(3, 3, 4)
_PW = _f32(4, 5)
# Each call: the kernel wrapper, its arguments, what the error names. They
# are refused while traced (the kernels would read out of bounds or write a
# wrong shape, silently).
_BAD_CALLS = {
    'sums of two shapes': (cpu_kernels.channel_sums,
                           (_f32(2, 4), _f32(64, 4)), 'a must be'),
    'sums of int32': (cpu_kernels.channel_sums,
                        (_f32(2, 4), _f32(2, 4, dtype=jnp.int32)), 'float32'),
    'pointwise channels': (cpu_kernels.relu_pointwise_forward,
                           (_f32(3, 5), _f32(4, 2)), 'share C'),
    'pointwise cotangent': (lambda x, k, g: cpu_kernels.relu_pointwise_backward(
        x, k, g), (_f32(3, 4), _f32(4, 2), _f32(3, 3)), 'g must be'),
    'depthwise rank': (lambda x, k: cpu_kernels.depthwise_forward(
        x, k, 1, 1, 1, 6, 6), (_f32(6, 6, 4), _DW), r'\[N, H, W, C\]'),
    'depthwise channels': (lambda x, k: cpu_kernels.depthwise_forward(
        x, k, 1, 1, 1, 6, 6), (_X, _f32(3, 3, 8)), 'depthwise kernel'),
    'depthwise output size': (lambda x, k: cpu_kernels.depthwise_forward(
        x, k, 2, 1, 1, 6, 6), (_X, _DW), r'\(h_out, w_out\) must be \[3, 3\]'),
    'depthwise cotangent': (lambda x, k, g: cpu_kernels.depthwise_backward(
        x, k, g, 1, 1, 1), (_X, _DW, _f32(2, 5, 5, 4)), 'g must be'),
    'separable pointwise': (lambda x, dw, pw: cpu_kernels.separable_forward(
        x, dw, pw, 1, 1, 1, 6, 6), (_X, _DW, _f32(8, 5)), 'share C'),
    'separable cotangent': (
        lambda x, dw, pw, g: cpu_kernels.separable_backward(
            x, dw, pw, g, 1, 1, 1), (_X, _DW, _PW, _f32(2, 6, 6, 4)),
        'g must be'),
}


@pytest.mark.parametrize('case', sorted(_BAD_CALLS))
def test_shapes_that_do_not_fit_are_refused_at_trace_time(case):
  fn, args, match = _BAD_CALLS[case]
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(fn, *args)


def test_shapes_that_fit_pass_the_checks():
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  shapes = [
      jax.eval_shape(cpu_kernels.channel_sums, _X, _X),
      jax.eval_shape(cpu_kernels.relu_pointwise_forward, _f32(3, 4), _PW),
      jax.eval_shape(lambda x, k: cpu_kernels.depthwise_forward(
          x, k, 2, 1, 1, 3, 3), _X, _DW),
      jax.eval_shape(lambda x, dw, pw, g: cpu_kernels.separable_backward(
          x, dw, pw, g, 1, 2, 2), _X, _DW, _PW, _f32(2, 6, 6, 5))[2],
  ]
  assert [s.shape for s in shapes] == [(2, 4), (3, 5), (2, 3, 3, 4), (4, 5)]
