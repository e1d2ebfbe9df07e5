"""Figures of a run: τ's top pairs, η over time, the architecture search.

Functions build matplotlib figures from in-memory records (the rows of
metrics.jsonl and the policy export); `dha_jax.train` saves them as PNG.
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

FIGSIZE = (7, 4)


def policy_figure(policy: dict[str, Any]) -> plt.Figure:
  """Horizontal bars of τ's most probable op pairs (from `export_policy`)."""
  pairs = policy['top_pairs']
  labels = [f"{p['op1']} → {p['op2']}" for p in pairs]
  probs = [p['probability'] for p in pairs]
  fig, ax = plt.subplots(figsize=FIGSIZE)
  ax.barh(range(len(pairs))[::-1], probs)
  ax.set_yticks(range(len(pairs))[::-1], labels, fontsize=8)
  ax.axvline(1.0 / len(policy['op_names'])**2, color='k', ls='--', lw=1,
             label='uniform')
  ax.set_xlabel('probability')
  ax.set_title(f"τ: top pairs (entropy {policy['entropy']:.3f} nats)")
  ax.legend()
  fig.tight_layout()
  return fig


def series_figure(records: Sequence[dict[str, Any]], keys: Sequence[str],
                  title: str) -> plt.Figure:
  """One panel per key: the key's value against `step` where present."""
  fig, axes = plt.subplots(len(keys), 1, figsize=(FIGSIZE[0], 2.2 * len(keys)),
                           sharex=True, squeeze=False)
  for ax, key in zip(axes[:, 0], keys):
    points = [(r['step'], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points), marker='.' if len(points) < 50 else None)
    ax.set_ylabel(key, fontsize=8)
  axes[-1, 0].set_xlabel('step')
  axes[0, 0].set_title(title)
  fig.tight_layout()
  return fig
