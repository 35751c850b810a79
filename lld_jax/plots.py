"""Evaluation and training plots (matplotlib, Agg backend). Every function writes one PNG and returns its path."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lld_jax import metrics as metrics_lib  # noqa: E402


def _save(fig, path) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return path


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
  cols = max(1, min(max_cols, n))
  return max(1, math.ceil(n / cols)), cols


def plot_pr_curves(precision, class_names: Sequence[str], path, recall_thresholds: np.ndarray | None = None,
                   iou: float = 0.5) -> str:
  """Precision-recall curve per class at one IoU threshold (default 0.5).

  precision: an `EvaluationResult`, a pycocotools `COCOeval` after accumulate(), COCO's full [T, R, K, A, M] array,
  a [T, R, K] array (T = COCO's 10 IoU thresholds 0.5:0.95) or a [R, K] array already at the IoU wanted. Classes
  without ground truth (precision -1) are left out.
  """
  iou_thresholds = np.linspace(0.5, 0.95, 10)
  if isinstance(precision, metrics_lib.EvaluationResult):
    recall_thresholds = precision.recall_thresholds
    iou_thresholds = precision.iou_thresholds
    precision = precision.precision
  elif hasattr(precision, 'eval') and hasattr(precision, 'params'):  # COCOeval
    recall_thresholds = np.asarray(precision.params.recThrs)
    iou_thresholds = np.asarray(precision.params.iouThrs)
    precision = precision.eval['precision']
  precision = np.asarray(precision, np.float64)
  if precision.ndim == 5:
    precision = precision[:, :, :, 0, -1]
  if precision.ndim == 3:
    precision = precision[int(np.argmin(np.abs(iou_thresholds - iou)))]
  if precision.ndim != 2:
    raise ValueError(f'cannot read a [R, K] precision array from shape {precision.shape}')
  if recall_thresholds is None:
    recall_thresholds = np.linspace(0, 1, precision.shape[0])
  fig, ax = plt.subplots(figsize=(8, 6))
  cmap = plt.get_cmap('tab20')
  drawn = 0
  for k, name in enumerate(class_names):
    p = precision[:, k]
    if np.all(p < 0):
      continue
    p = np.where(p < 0, 0, p)
    ax.plot(recall_thresholds, p, color=cmap(k % 20), label=f'{name} (AP {p.mean():.3f})')
    drawn += 1
  if not drawn:
    ax.text(0.5, 0.5, 'no class with ground truth', ha='center', va='center', transform=ax.transAxes)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel('recall')
  ax.set_ylabel('precision')
  ax.set_title(f'Precision-recall per class at IoU {iou:g}')
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(fontsize=7, loc='lower left', ncol=1 if drawn <= 8 else 2)
  return _save(fig, path)


def plot_attribute_confusions(confusions, path, normalize: bool = True) -> str:
  """Grid of confusion matrices: one row per protocol, one column per attribute.

  confusions: an `EvaluationResult`, a dict keyed by (protocol, attribute) of `AttributeConfusion`, or a list of them.
  Cells show row-normalised rates (if normalize) with raw counts; the last column counts misses.
  """
  if isinstance(confusions, metrics_lib.EvaluationResult):
    confusions = confusions.confusions
  items = list(confusions.values()) if isinstance(confusions, Mapping) else list(confusions)
  protocols = list(dict.fromkeys(c.protocol for c in items))
  attributes = list(dict.fromkeys(c.attribute for c in items))
  by_key = {(c.protocol, c.attribute): c for c in items}
  rows, cols = max(1, len(protocols)), max(1, len(attributes))
  fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows), squeeze=False)
  for r, proto in enumerate(protocols):
    for c, attr in enumerate(attributes):
      ax = axes[r, c]
      conf = by_key.get((proto, attr))
      if conf is None:
        ax.axis('off')
        continue
      m = np.asarray(conf.matrix, np.float64)
      sums = m.sum(axis=1, keepdims=True)
      rates = np.divide(m, sums, out=np.zeros_like(m), where=sums > 0) if normalize else m
      ax.imshow(rates, cmap='Blues', vmin=0, vmax=1 if normalize else max(1.0, m.max()))
      for i in range(m.shape[0]):
        for j in range(m.shape[1]):
          ax.text(j, i, f'{int(m[i, j])}', ha='center', va='center', fontsize=7,
                  color='white' if rates[i, j] > (0.5 if normalize else m.max() / 2) else 'black')
      ax.set_xticks(range(m.shape[1]))
      ax.set_xticklabels(conf.column_names, rotation=45, ha='right', fontsize=6)
      ax.set_yticks(range(m.shape[0]))
      ax.set_yticklabels(conf.value_names, fontsize=6)
      ax.set_title(f'{attr}\n({proto})', fontsize=8)
      if c == 0:
        ax.set_ylabel('truth', fontsize=7)
      if r == rows - 1:
        ax.set_xlabel('predicted', fontsize=7)
  if not items:
    axes[0, 0].text(0.5, 0.5, 'no attribute confusions', ha='center', va='center')
  fig.tight_layout()
  return _save(fig, path)


def plot_domain_bars(metrics: Mapping[str, float], path) -> str:
  """Bar chart of `domains/<domain>/mAP50` and `.../mAP50_95` from a metrics dict (or an `EvaluationResult`)."""
  if isinstance(metrics, metrics_lib.EvaluationResult):
    metrics = metrics.metrics
  domains = sorted({k.split('/')[1] for k in metrics if k.startswith('domains/') and k.count('/') == 2})
  fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(domains) + 2), 4))
  x = np.arange(len(domains))
  width = 0.4
  for i, key in enumerate(('mAP50', 'mAP50_95')):
    vals = [metrics.get(f'domains/{d}/{key}', np.nan) for d in domains]
    bars = ax.bar(x + (i - 0.5) * width, vals, width, label=key)
    for b, v in zip(bars, vals):
      if np.isfinite(v):
        ax.text(b.get_x() + b.get_width() / 2, v, f'{v:.2f}', ha='center', va='bottom', fontsize=6)
  ax.set_xticks(x)
  ax.set_xticklabels(domains, rotation=30, ha='right')
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('mAP')
  ax.set_title('Detection mAP per domain')
  if not domains:
    ax.text(0.5, 0.5, 'no domain metrics', ha='center', va='center', transform=ax.transAxes)
  else:
    ax.legend(fontsize=8)
  ax.grid(axis='y', alpha=0.3)
  return _save(fig, path)


def plot_training_curves(history: Mapping[str, Sequence[tuple[float, float]]], path, max_cols: int = 3) -> str:
  """One panel per series of (step, value) pairs, e.g. {'train/loss': [(0, 2.3), (100, 1.7)], 'eval/mAP50': ...}."""
  names = [k for k in history if len(history[k])]
  rows, cols = _grid(len(names), max_cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
  for ax in axes.flat[len(names):]:
    ax.axis('off')
  for ax, name in zip(axes.flat, names):
    pts = np.asarray(history[name], np.float64).reshape(-1, 2)
    ax.plot(pts[:, 0], pts[:, 1], marker='.' if len(pts) < 50 else None, lw=1)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.grid(alpha=0.3)
  if not names:
    axes[0, 0].axis('on')
    axes[0, 0].text(0.5, 0.5, 'empty history', ha='center', va='center')
  fig.tight_layout()
  return _save(fig, path)


def write_evaluation_plots(result: metrics_lib.EvaluationResult, out_dir, prefix: str = '') -> dict[str, str]:
  """Writes pr_curves.png, attribute_confusions.png and domain_map.png under out_dir; returns name -> path."""
  os.makedirs(out_dir, exist_ok=True)
  return {
      'pr_curves': plot_pr_curves(result, result.class_names, os.path.join(out_dir, f'{prefix}pr_curves.png')),
      'attribute_confusions': plot_attribute_confusions(
          result, os.path.join(out_dir, f'{prefix}attribute_confusions.png')),
      'domain_map': plot_domain_bars(result.metrics, os.path.join(out_dir, f'{prefix}domain_map.png')),
  }
