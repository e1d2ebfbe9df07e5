"""Throughput of JAX op pairs (`apply_ops`) against the reference's PIL loop.

The reference augments on the host: per image, a PIL image goes through op1
then op2 (docs/fidelity.md, 'DA'). Here the same pairs, levels and signs run
(a) jitted on the device batch, `apply_ops` twice, and (b) as a Pillow loop
over the batch with the numpy <-> PIL conversions a data loader does. Images
are CIFAR-10 test images from the zip (random pixels if it is absent),
upscaled with PIL's bicubic resize for sizes above 32. The last line printed
is JSON:

  python -m experiments.bench_augment [--batch-size 256 --repeats 10
      --sizes 32,224 --strategy auto --one-core]

Keys: `jax_images_per_s`, `pil_images_per_s`, `speedup` (per size), and per
size the compile time, the strategy used, JAX-vs-PIL agreement and timings;
`machine` says where it ran. The PIL loop is one process, one thread; JAX on
CPU uses XLA's thread pool (all usable cores) unless --one-core pins the
whole process to one core, a per-core comparison. Compare on a quiet
machine; the reference runs its loop in several DataLoader workers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
import zipfile

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from experiments.paths import CIFAR10_ZIP

CIFAR_SIZE = 32
MAX_LEVEL = 10.
FILL = (125, 123, 114)


def load_images(path: str, num: int, size: int) -> tuple[np.ndarray, str]:
  """num test images of CIFAR-10 (or random ones) as uint8 [num, s, s, 3]."""
  if os.path.exists(path):
    with zipfile.ZipFile(path) as archive:
      names = sorted(n for n in archive.namelist()
                     if n.startswith('test/') and n.endswith('.jpg'))[:num]
      images = [Image.open(io.BytesIO(archive.read(n))).convert('RGB')
                for n in names]
    source = f'cifar10 test ({path})'
  else:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(a) for a in rng.integers(
        0, 256, (num, CIFAR_SIZE, CIFAR_SIZE, 3), dtype=np.uint8)]
    source = 'random pixels (CIFAR-10 zip not found)'
  if size != CIFAR_SIZE:
    images = [im.resize((size, size), Image.BICUBIC) for im in images]
  return np.stack([np.asarray(im) for im in images]), source


def pil_op(im: Image.Image, name: str, level: float,
           sign: float) -> Image.Image:
  """The reference's op (data/auto_augment.py) with bilinear resampling."""
  r = level / MAX_LEVEL
  affine = dict(resample=Image.BILINEAR, fillcolor=FILL)
  if name == 'AutoContrast':
    return ImageOps.autocontrast(im)
  if name == 'Equalize':
    return ImageOps.equalize(im)
  if name == 'Rotate':
    return im.rotate(sign * 30. * r, **affine)
  if name == 'Posterize':
    return ImageOps.posterize(im, int(3 * r + 1))
  if name == 'Solarize':
    return ImageOps.solarize(im, int(256 * r))
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return getattr(ImageEnhance, name)(im).enhance(0.1 + 1.8 * r)
  width, height = im.size
  matrices = {'ShearX': (1, sign * 0.3 * r, 0, 0, 1, 0),
              'ShearY': (1, 0, 0, sign * 0.3 * r, 1, 0),
              'TranslateX': (1, 0, sign * 0.45 * r * width, 0, 1, 0),
              'TranslateY': (1, 0, 0, 0, 1, sign * 0.45 * r * height)}
  if name in matrices:
    return im.transform(im.size, Image.AFFINE, matrices[name], **affine)
  return im


def pil_pairs(images, names, op1, op2, levels, signs) -> np.ndarray:
  out = []
  for k, image in enumerate(images):
    im = Image.fromarray(image)
    im = pil_op(im, names[op1[k]], levels[0, k], signs[0, k])
    im = pil_op(im, names[op2[k]], levels[1, k], signs[1, k])
    out.append(np.asarray(im))
  return np.stack(out)


def timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def bench_size(size: int, args: argparse.Namespace) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from dha_jax.augment import ops  # pylint: disable=g-import-not-at-top

  images, source = load_images(args.cifar_zip, args.batch_size, size)
  rng = np.random.default_rng(1)
  num = len(images)
  op1 = rng.integers(0, ops.NUM_OPS, num).astype(np.int32)
  op2 = rng.integers(0, ops.NUM_OPS, num).astype(np.int32)
  levels = rng.uniform(0, MAX_LEVEL, (2, num)).astype(np.float32)
  signs = rng.choice([-1., 1.], (2, num)).astype(np.float32)

  @jax.jit
  def jax_pairs(images, op1, op2, levels, signs):
    apply = lambda x, op, k: ops.apply_ops(  # pylint: disable=g-long-lambda
        x, op, levels[k], signs[k], max_level=MAX_LEVEL, fill_value=FILL,
        strategy=args.strategy)
    return apply(apply(images, op1, 0), op2, 1)

  device_args = jax.device_put((images, op1, op2, levels, signs))
  start = time.perf_counter()
  jax_out = np.asarray(jax.block_until_ready(jax_pairs(*device_args)))
  compile_s = time.perf_counter() - start
  jax_times = timed(lambda: jax.block_until_ready(jax_pairs(*device_args)),
                    args.repeats)
  pil_out = pil_pairs(images, ops.OP_NAMES, op1, op2, levels, signs)
  pil_times = timed(
      lambda: pil_pairs(images, ops.OP_NAMES, op1, op2, levels, signs),
      args.repeats)
  jax_rate = num / statistics.median(jax_times)
  pil_rate = num / statistics.median(pil_times)
  diff = np.abs(jax_out.astype(np.int32) - pil_out)
  strategy = args.strategy
  if strategy == 'auto':
    strategy = 'switch' if jax.default_backend() == 'cpu' else 'select'
  return {
      'jax_images_per_s': jax_rate,
      'pil_images_per_s': pil_rate,
      'speedup': jax_rate / pil_rate,
      'strategy': strategy,
      'jax_compile_s': compile_s,
      'jax_batch_s_min': min(jax_times),
      'pil_batch_s_min': min(pil_times),
      # Float32 vs PIL's double in bilinear resampling: a few pixels one
      # grey level apart, and the level draws are float32 on both sides.
      'mean_abs_diff_vs_pil': float(diff.mean()),
      'frac_pixels_diff_gt1': float((diff > 1).mean()),
      'images': source,
  }


def machine_info(args: argparse.Namespace) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import PIL  # pylint: disable=g-import-not-at-top
  return {
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'cpu_count': os.cpu_count(),
      'usable_cpus': len(os.sched_getaffinity(0)),
      'load_average': os.getloadavg(),
      'machine': platform.processor() or platform.machine(),
      'platform': platform.platform(),
      'jax': jax.__version__,
      'pillow': PIL.__version__,
      'jax_threads': ('1 (process pinned to one core)' if args.one_core
                      else 'XLA default (all usable cores)'),
      'pil_threads': 1,
      'batch_size': args.batch_size,
      'repeats': args.repeats,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--sizes', default='32,224',
                      help='comma-separated image sizes')
  parser.add_argument('--strategy', default='auto',
                      choices=('auto', 'switch', 'select'))
  parser.add_argument('--one-core', action='store_true',
                      help='pin the process (JAX and PIL) to one CPU core')
  parser.add_argument('--cifar-zip', default=CIFAR10_ZIP)
  args = parser.parse_args()
  if args.one_core:
    # Before JAX starts: XLA sizes its CPU thread pool from the affinity.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  sizes = [int(s) for s in args.sizes.split(',')]
  results = {}
  for size in sizes:
    results[str(size)] = bench_size(size, args)
    print(f'{size}px: {json.dumps(results[str(size)])}', flush=True)
  summary = {
      key: {size: r[key] for size, r in results.items()}
      for key in ('jax_images_per_s', 'pil_images_per_s', 'speedup')}
  summary['per_size'] = results
  summary['machine'] = machine_info(args)
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
