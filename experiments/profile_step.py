"""Where a train step's time goes: XLA's per-op times, by kind of op.

Traces a few steps of a mode's first-phase train step with `jax.profiler`
(the Perfetto trace that `create_perfetto_trace=True` writes), then charges
every executed XLA op (a thunk: a fusion, a convolution, a copy) to the
source op it came from, read from the op's metadata in the compiled HLO
(the JAX name stack: Flax module path, primitive, `transpose(...)` for the
backward pass). The table sums them by kind of op, forward and backward:

  python -m experiments.profile_step --layers 5 --channels 8 --batch 96 \\
      --aux 1 --cutout 16 --genotype experiments/bench_genotype.json \\
      --threads 1 --mode ista_one_stage

Options as `bench_step` (experiments/benchlib.py), plus `--mode` and
`--top` (how many of the costliest single source ops to list). The last line
printed is JSON: {kind: {'forward_ms', 'backward_ms'}} per step, and the
step's wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Iterable

import jax

from experiments import benchlib

# (kind, pattern on the op's JAX name stack), first match wins.
KINDS = (
    # The sep/dil convs' ReLU → depthwise → pointwise, one op per pass on
    # CPU (nas/separable_conv.py); composed of XLA ops, the next two kinds.
    ('ReLU-depthwise-pointwise (sep/dil, CPU kernels)',
     re.compile(r'DilConv_\d+/ffi_call')),
    # The cells' ReLU → 1×1 conv preprocessing as one op on CPU.
    ('ReLU-pointwise (preprocessing, CPU kernels)',
     re.compile(r'pre\d/ffi_call')),
    ('depthwise conv', re.compile(r'DilConv_\d+/Conv_0/')),
    ('pointwise conv (sep/dil)', re.compile(r'DilConv_\d+/Conv_1/')),
    ('BatchNorm', re.compile(r'BatchNorm')),
    ('pools', re.compile(r'max_pool|avg_pool|reduce_window|select_and_scatter'
                         r'|_pool_3x3')),
    ('other convs (stem, preprocessing, reduce, aux head)',
     re.compile(r'conv_general_dilated|Conv_\d+/')),
    ('DA ops and policy', re.compile(r'augment|apply_ops|policy|gumbel')),
    ('optimizer and HPO', re.compile(r'optax|hypergradient|hpo|sgd|adam')),
)
OTHER = 'other (elementwise, α sums, loss, copies)'
# XLA-made fusions whose ops carry no metadata at all.
UNATTRIBUTED = 'unattributed XLA fusions'
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=.*?\s([\w\-]+)\(')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_CONTAINERS = ('while', 'conditional', 'call')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: the JAX name stack of its metadata}.

  A fusion made by XLA may carry no metadata of its own (YNNPACK's
  `ynn_fusion`, for example); it is charged to the ops it fused: its
  computation's root, or else the most frequent name stack inside it.
  Loops and other ops that run a computation (`while`, `conditional`,
  `call`) are left out: the ops of their bodies are traced themselves, so
  counting the container too would count its time twice.
  """
  names, calls, inside = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m and m.group(3) in _CONTAINERS:
      continue
    if m:
      op = _OP_NAME.search(line)
      name = m.group(2)
      names[name] = op.group(1) if op else ''
      called = _CALLS.search(line)
      if called:
        calls[name] = called.group(1)
      if computation is not None and names[name]:
        stacks = inside.setdefault(computation, collections.Counter())
        # The root's name stack counts as if it were every op inside.
        stacks[names[name]] += 1_000_000 if m.group(1) else 1
      continue
    c = _COMPUTATION.match(line)
    if c:
      computation = c.group(1)
  for name, called in calls.items():
    if not names[name] and called in inside:
      names[name] = inside[called].most_common(1)[0][0]
  return names


def kind_of(op_name: str) -> str:
  if not op_name:
    return UNATTRIBUTED
  for kind, pattern in KINDS:
    if pattern.search(op_name):
      return kind
  return OTHER


def is_backward(op_name: str) -> bool:
  return 'transpose(' in op_name


def thunk_times(trace_dir: str) -> dict[str, float]:
  """{thunk (HLO instruction) name: total µs} of a Perfetto trace."""
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                    recursive=True)
  if not paths:
    raise RuntimeError(f'no perfetto_trace.json.gz under {trace_dir}')
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X':
      totals[e['name']] += e.get('dur', 0.0)
  return totals


def breakdown(totals: dict[str, float], names: dict[str, str], steps: int
              ) -> tuple[dict[str, dict[str, float]], list[tuple[str, float]]]:
  """Per-step ms by kind (forward / backward), and the costliest source
  ops (name stack without the jit prefix) in ms."""
  kinds = collections.defaultdict(lambda: {'forward_ms': 0.0,
                                           'backward_ms': 0.0})
  sources = collections.Counter()
  for thunk, micros in totals.items():
    if thunk not in names:
      continue   # a runtime event, not an XLA op
    op_name = names[thunk]
    ms = micros / 1e3 / steps
    key = 'backward_ms' if is_backward(op_name) else 'forward_ms'
    kinds[kind_of(op_name)][key] += ms
    sources[op_name or thunk] += ms
  return dict(kinds), sources.most_common()


def _table(kinds: dict[str, dict[str, float]], step_ms: float
           ) -> Iterable[str]:
  """Rows by kind; shares of the time of all attributed XLA ops (traced
  steps run slower than untraced ones, so the untraced step time is given
  beside them, not divided by)."""
  ops = sum(sum(t.values()) for t in kinds.values())
  yield f'{"kind":52s} {"fwd ms":>8s} {"bwd ms":>8s} {"share":>6s}'
  ordered = sorted(kinds.items(), key=lambda kv: -sum(kv[1].values()))
  for kind, t in ordered:
    total = t['forward_ms'] + t['backward_ms']
    yield (f'{kind:52s} {t["forward_ms"]:8.1f} {t["backward_ms"]:8.1f} '
           f'{total / ops:6.1%}')
  yield f'{"all XLA ops of a traced step":52s} {ops:17.1f}'
  yield f'{"untraced step (best of --steps)":52s} {step_ms:17.1f}'


def main() -> None:
  args = benchlib.parse_args(__doc__, mode='ista_one_stage', hpo_mode='exact',
                             hpo_batch=0, top=15)
  setup = benchlib.search_step_setup(args.mode, args, args.hpo_mode,
                                     args.hpo_batch)
  compiled = setup.fn.lower(setup.state, setup.batch, setup.heldout).compile()
  names = hlo_op_names(compiled.as_text())
  state, times = setup.state, []
  for _ in range(args.steps):   # warm-up and the untraced step time
    start = time.perf_counter()
    state, metrics = compiled(state, setup.batch, setup.heldout)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_ms = min(times) * 1e3
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, metrics = compiled(state, setup.batch, setup.heldout)
        jax.block_until_ready(metrics)
    totals = thunk_times(trace_dir)
  kinds, sources = breakdown(totals, names, args.steps)
  print(f'{args.mode}: {args.steps} traced steps, '
        f'{json.dumps(benchlib.network_info(args))}')
  for line in _table(kinds, step_ms):
    print(line)
  print(f'\nthe {args.top} costliest source ops (ms per step):')
  for op_name, ms in sources[:args.top]:
    print(f'{ms:8.1f}  {op_name[-110:]}')
  print(json.dumps({'mode': args.mode, 'step_ms': step_ms, 'kinds': kinds,
                    **benchlib.network_info(args)}, sort_keys=True))


if __name__ == '__main__':
  main()
