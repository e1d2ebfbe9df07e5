"""CPU kernels of our own, called through XLA's FFI and compiled on first use.

XLA:CPU runs these ops several times slower than the memory they read
allows, or reads and writes their intermediate values to memory;
`cpu_kernels.cc` computes them instead:

* the depthwise conv: XLA's grouped convolution is slow, and the k² shifted
  multiply-adds that fuse well forward ('shifted' in `nas/depthwise.py`)
  need k² passes over the activations for the kernel gradient and a strided
  interleave for ∂x. The kernels compute the forward conv, ∂x and ∂kernel of
  one image at a time in cache, in one pass, vectorised over channels;
* DARTS' ReLU → depthwise → pointwise (`nas/separable_conv.py`) as one
  op per image: its activations never leave the cache, and the backward
  pass recomputes the depthwise output instead of reading it back. The
  step is bound by memory traffic, not arithmetic;
* ReLU → 1×1 conv (the preprocessing of DARTS' cells), the same way a
  block of rows at a time: XLA writes the ReLU's output to memory for its
  matrix product and keeps it for the backward pass;
* reductions over the major axes of an [..., C] array (BatchNorm's
  statistics and the sums of its backward pass, `nas/batch_norm.py`): one
  pass, float32 vectors over blocks of rows, double across blocks.

All split their work over the threads of XLA's intra-op pool.

**Build.** The source ships with the package. The first call to
`available()` in a process compiles it with the machine's C++ compiler
(`$CXX`, else `c++`; C++17) against the FFI headers that jaxlib ships
(`jax.ffi.include_dir()`), with `-march=native`, into a cache folder:
`$DHA_JAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/dha_jax`, else
`~/.cache/dha_jax`. The library's name holds a digest of the source, the
flags, the compiler's version, jaxlib's version and the CPU's model and
feature flags, so a changed source, compiler, jaxlib or CPU (a cache shared
by the nodes of a cluster) builds anew and a stale library is never loaded.
The build is written to a temporary file and renamed into place, so
processes that build at once (pytest workers, the hosts of one job) never
load a half-written library. It takes a few seconds, once per machine.

**When they are used.** By default (`preferred()`) on the CPU backend of a
process that sees one device: an FFI call cannot be split over a sharded
batch. Within `preference(False)` they are not (what counts multiply-adds
from a trace, `nas/resources.py`, needs the XLA forms); within
`preference(True)` they are wherever they are built.

**Without a compiler** (or when the build fails) `available()` is False and
`unavailable_reason()` says why; `model.depthwise = 'auto'` then uses the
pure-XLA 'shifted' form, BatchNorm XLA's reductions, and an explicit 'ffi'
raises with that reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Iterator

import jax
import jaxlib
import numpy as np

from dha_jax.nas import windows

SOURCE = pathlib.Path(__file__).with_name('cpu_kernels.cc')
CACHE_ENV = 'DHA_JAX_KERNEL_CACHE'
COMPILER_ENV = 'CXX'
DEFAULT_COMPILER = 'c++'
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
# A build takes a few seconds; a compiler that hangs must not hang training.
BUILD_TIMEOUT_S = 300

_DEPTHWISE_FORWARD = 'dha_depthwise_forward'
_DEPTHWISE_BACKWARD = 'dha_depthwise_backward'
_SEPARABLE_FORWARD = 'dha_separable_forward'
_SEPARABLE_BACKWARD = 'dha_separable_backward'
_RELU_POINTWISE_FORWARD = 'dha_relu_pointwise_forward'
_RELU_POINTWISE_BACKWARD = 'dha_relu_pointwise_backward'
_CHANNEL_SUMS = 'dha_channel_sums'
_SYMBOLS = {_DEPTHWISE_FORWARD: 'DhaDepthwiseForward',
            _DEPTHWISE_BACKWARD: 'DhaDepthwiseBackward',
            _SEPARABLE_FORWARD: 'DhaSeparableForward',
            _SEPARABLE_BACKWARD: 'DhaSeparableBackward',
            _RELU_POINTWISE_FORWARD: 'DhaReluPointwiseForward',
            _RELU_POINTWISE_BACKWARD: 'DhaReluPointwiseBackward',
            _CHANNEL_SUMS: 'DhaChannelSums'}


# `preference`'s choice where one is in force; None: the default rule.
_PREFERENCE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    'dha_jax_cpu_kernels_preference', default=None)


class KernelBuildError(RuntimeError):
  """The CPU kernels could not be built or loaded; the message says why."""


def cache_dir() -> pathlib.Path:
  """Where built libraries are kept (see the module docstring)."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'dha_jax'


def _cpu_identity() -> str:
  """The CPU's model and feature flags: a `-march=native` build runs only on
  CPUs that have its features."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return f'{platform.machine()} {platform.processor()}'
  wanted = ('model name', 'flags', 'Features', 'CPU part')
  return '\n'.join(sorted({line for line in lines
                           if line.split(':')[0].strip() in wanted}))


def _build(compiler: str) -> pathlib.Path:
  """Compiles `SOURCE` into the cache (or finds it there); its path."""
  try:
    version = subprocess.run([compiler, '--version'], capture_output=True,
                             text=True, timeout=BUILD_TIMEOUT_S).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelBuildError(f'cannot run the C++ compiler {compiler!r}: {e}')
  digest = hashlib.sha256('\0'.join(
      (SOURCE.read_text(), ' '.join(FLAGS), version, jaxlib.__version__,
       _cpu_identity())).encode()).hexdigest()[:16]
  folder = cache_dir()
  library = folder / f'cpu_kernels-{digest}.so'
  if library.exists():
    return library
  try:
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, suffix='.so.partial')
    os.close(fd)
  except OSError as e:
    raise KernelBuildError(f'cannot write the kernel cache {folder}: {e}; set '
                           f'{CACHE_ENV} to a writable folder')
  command = [compiler, *FLAGS, '-isystem', jax.ffi.include_dir(),
             str(SOURCE), '-o', partial]
  try:
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)
  except (OSError, subprocess.SubprocessError) as e:
    os.unlink(partial)
    raise KernelBuildError(f'{" ".join(command)} failed: {e}')
  if done.returncode != 0:
    os.unlink(partial)
    tail = '\n'.join(done.stderr.strip().splitlines()[-20:])
    raise KernelBuildError(f'{" ".join(command)} failed:\n{tail}')
  os.replace(partial, library)
  return library


@functools.cache
def _load() -> ctypes.CDLL | KernelBuildError:
  """The built library, its targets registered with XLA; or the error."""
  compiler = os.environ.get(COMPILER_ENV) or DEFAULT_COMPILER
  if shutil.which(compiler) is None:
    return KernelBuildError(
        f'no C++ compiler: {compiler!r} is not on PATH (install g++ or clang, '
        f'or name one in ${COMPILER_ENV})')
  try:
    library = ctypes.CDLL(str(_build(compiler)))
  except KernelBuildError as e:
    return e
  except OSError as e:
    return KernelBuildError(f'cannot load the built kernels: {e}')
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return library


def available() -> bool:
  """Whether the kernels are built and registered (builds them once)."""
  return not isinstance(_load(), KernelBuildError)


def preferred() -> bool:
  """Whether the networks use the kernels by default ('auto'): the CPU
  backend, one device in all, and the kernels built.

  With several devices (forced host devices, several processes) the step
  is one program over a sharded batch, and XLA's partitioner, which cannot
  split an FFI call, gathers its operands and runs it on the whole batch on
  every device: the values stay right, the data parallelism is lost. There
  the pure-XLA forms, which it partitions, are used.

  Within `preference(use)`: `use` (True only where the kernels are built).
  """
  use = _PREFERENCE.get()
  if use is not None:
    return use and available()
  return (jax.default_backend() == 'cpu' and jax.device_count() == 1
          and available())


@contextlib.contextmanager
def preference(use: bool) -> Iterator[None]:
  """Within: `preferred()` is `use` whatever the backend and devices (True
  still needs the kernels built). It is read when a function is traced, so
  it governs the functions traced within."""
  token = _PREFERENCE.set(use)
  try:
    yield
  finally:
    _PREFERENCE.reset(token)


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True)."""
  loaded = _load()
  return str(loaded) if isinstance(loaded, KernelBuildError) else None


def _require() -> None:
  loaded = _load()
  if isinstance(loaded, KernelBuildError):
    raise loaded


def _check_float32(op: str, **arrays: jax.Array) -> None:
  for name, a in arrays.items():
    if a.dtype != np.float32:
      raise ValueError(f'{op}: the kernels take float32, got {name} of '
                       f'{a.dtype}; cast it or use the XLA form')


def _check_shape(op: str, name: str, shape: tuple[int, ...],
                 expected: tuple[int, ...]) -> None:
  if tuple(shape) != tuple(expected):
    raise ValueError(f'{op}: {name} must be {list(expected)}, got '
                     f'{list(shape)}')


def _check_window(op: str, x: jax.Array, kernel_shape: tuple[int, ...],
                  stride: int, dilation: int, padding: int) -> tuple[int, int]:
  """Checks an [N, H, W, C] input and its [k, k, C] depthwise kernel; the
  output's (H', W')."""
  if x.ndim != 4:
    raise ValueError(f'{op}: x must be [N, H, W, C], got {list(x.shape)}')
  k = kernel_shape[0]
  _check_shape(op, 'the depthwise kernel', kernel_shape, (k, k, x.shape[3]))
  if stride < 1 or dilation < 1 or padding < 0:
    raise ValueError(f'{op}: stride ({stride}) and dilation ({dilation}) '
                     f'must be positive and padding ({padding}) non-negative')
  h_out, w_out = (windows.output_size(n, k, stride, dilation, padding)
                  for n in x.shape[1:3])
  if h_out < 1 or w_out < 1:
    raise ValueError(f'{op}: a {k}×{k} window (dilation {dilation}, padding '
                     f'{padding}) does not fit in {x.shape[1]}×{x.shape[2]}')
  return h_out, w_out


def _check_rows(op: str, x: jax.Array, kernel: jax.Array) -> None:
  """Checks x [..., C] and a 1×1 kernel [C, C_out]."""
  if x.ndim < 1 or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
    raise ValueError(f'{op}: x [..., C] and kernel [C, C_out] must share C, '
                     f'got {list(x.shape)} and {list(kernel.shape)}')


def _attributes(stride: int, dilation: int, padding: int) -> dict:
  return {'stride': np.int64(stride), 'dilation': np.int64(dilation),
          'padding': np.int64(padding)}


def depthwise_forward(x: jax.Array, kernel: jax.Array, stride: int,
                      dilation: int, padding: int, h_out: int, w_out: int
                      ) -> jax.Array:
  """out[n, y, x, c] = Σ_{i,j} x_pad[n, s·y + d·i, s·x + d·j, c] · kernel[i, j, c]
  with x_pad x with `padding` zeros around H and W.

  Args:
    x: [N, H, W, C] float32.
    kernel: [k, k, C] float32.
    stride, dilation, padding: the same for both spatial axes.
    h_out, w_out: the output's size (`windows.output_size`).

  Returns:
    [N, h_out, w_out, C].

  Raises:
    ValueError: at trace time, for shapes or dtypes that do not fit.
  """
  _check_float32('depthwise_forward', x=x, kernel=kernel)
  _check_shape('depthwise_forward', '(h_out, w_out)', (h_out, w_out),
               _check_window('depthwise_forward', x, kernel.shape, stride,
                             dilation, padding))
  _require()
  out = jax.ShapeDtypeStruct((x.shape[0], h_out, w_out, x.shape[3]), x.dtype)
  return jax.ffi.ffi_call(_DEPTHWISE_FORWARD, out)(
      x, kernel, **_attributes(stride, dilation, padding))


def depthwise_backward(x: jax.Array, kernel: jax.Array, g: jax.Array,
                       stride: int, dilation: int, padding: int
                       ) -> tuple[jax.Array, jax.Array]:
  """(∂x, ∂kernel) of `depthwise_forward` for the cotangent g
  [N, h_out, w_out, C]: ∂x [N, H, W, C], ∂kernel [k, k, C]."""
  _check_float32('depthwise_backward', x=x, kernel=kernel, g=g)
  h_out, w_out = _check_window('depthwise_backward', x, kernel.shape, stride,
                               dilation, padding)
  _check_shape('depthwise_backward', 'g', g.shape,
               (x.shape[0], h_out, w_out, x.shape[3]))
  _require()
  return jax.ffi.ffi_call(
      _DEPTHWISE_BACKWARD,
      (jax.ShapeDtypeStruct(x.shape, x.dtype),
       jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)))(
           x, kernel, g, **_attributes(stride, dilation, padding))


def separable_forward(x: jax.Array, depthwise_kernel: jax.Array,
                      pointwise_kernel: jax.Array, stride: int,
                      dilation: int, padding: int, h_out: int, w_out: int
                      ) -> jax.Array:
  """ReLU → depthwise → pointwise in one pass: `depthwise_forward` of
  max(x, 0) with depthwise_kernel [k, k, C], times pointwise_kernel
  [C, C_out]: [N, h_out, w_out, C_out]."""
  _check_float32('separable_forward', x=x, depthwise_kernel=depthwise_kernel,
                 pointwise_kernel=pointwise_kernel)
  _check_shape('separable_forward', '(h_out, w_out)', (h_out, w_out),
               _check_window('separable_forward', x, depthwise_kernel.shape,
                             stride, dilation, padding))
  _check_rows('separable_forward', x, pointwise_kernel)
  _require()
  out = jax.ShapeDtypeStruct(
      (x.shape[0], h_out, w_out, pointwise_kernel.shape[1]), x.dtype)
  return jax.ffi.ffi_call(_SEPARABLE_FORWARD, out)(
      x, depthwise_kernel, pointwise_kernel,
      **_attributes(stride, dilation, padding))


def separable_backward(x: jax.Array, depthwise_kernel: jax.Array,
                       pointwise_kernel: jax.Array, g: jax.Array,
                       stride: int, dilation: int, padding: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(∂x, ∂depthwise_kernel, ∂pointwise_kernel) of `separable_forward` for
  the cotangent g [N, h_out, w_out, C_out]; the depthwise output is
  recomputed, one image at a time, not kept."""
  _check_float32('separable_backward', x=x, depthwise_kernel=depthwise_kernel,
                 pointwise_kernel=pointwise_kernel, g=g)
  h_out, w_out = _check_window('separable_backward', x,
                               depthwise_kernel.shape, stride, dilation,
                               padding)
  _check_rows('separable_backward', x, pointwise_kernel)
  _check_shape('separable_backward', 'g', g.shape,
               (x.shape[0], h_out, w_out, pointwise_kernel.shape[1]))
  _require()
  return jax.ffi.ffi_call(
      _SEPARABLE_BACKWARD,
      tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
            for a in (x, depthwise_kernel, pointwise_kernel)))(
                x, depthwise_kernel, pointwise_kernel, g,
                **_attributes(stride, dilation, padding))


def relu_pointwise_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """max(x, 0) · kernel over the channel axis, a block of rows at a time:
  x [..., C] and kernel [C, C_out] float32 → [..., C_out]."""
  _check_float32('relu_pointwise_forward', x=x, kernel=kernel)
  _check_rows('relu_pointwise_forward', x, kernel)
  _require()
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (kernel.shape[1],), x.dtype)
  return jax.ffi.ffi_call(_RELU_POINTWISE_FORWARD, out)(x, kernel)


def relu_pointwise_backward(x: jax.Array, kernel: jax.Array, g: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
  """(∂x, ∂kernel) of `relu_pointwise_forward` for the cotangent g
  [..., C_out]; the ReLU is recomputed from x, not kept."""
  _check_float32('relu_pointwise_backward', x=x, kernel=kernel, g=g)
  _check_rows('relu_pointwise_backward', x, kernel)
  _check_shape('relu_pointwise_backward', 'g', g.shape,
               x.shape[:-1] + (kernel.shape[1],))
  _require()
  return jax.ffi.ffi_call(
      _RELU_POINTWISE_BACKWARD,
      (jax.ShapeDtypeStruct(x.shape, x.dtype),
       jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)))(x, kernel, g)


def channel_sums(a: jax.Array, b: jax.Array) -> jax.Array:
  """[Σ b, Σ a·b] over every axis but the last, for a and b [..., C]
  float32 of one shape: [2, C], summed in double and rounded to float32."""
  _check_float32('channel_sums', a=a, b=b)
  if b.ndim < 1:
    raise ValueError('channel_sums: a and b must be [..., C], got scalars')
  _check_shape('channel_sums', 'a', a.shape, b.shape)
  _require()
  return jax.ffi.ffi_call(
      _CHANNEL_SUMS, jax.ShapeDtypeStruct((2, b.shape[-1]), b.dtype))(a, b)
