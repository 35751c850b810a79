r"""TXL-PBC with simulated sparse labels (one fifth of each train image annotated), region-restricted matching.

  python -m lld_jax.train --config=configs/txl_pbc_sparse.py --workdir=runs/txl_pbc_sparse \
      --config.dataset.manual_dir=../shared/data/txl_pbc

Evaluated on the fully annotated val split. Compare with configs/txl_pbc.py at the same budget. Measured on 2 CPU
cores (XLA level 1) through `scripts/sparse_benchmark.py --dataset=txl_pbc` (docs/results.md). The full 1,800
steps (about an hour, as configs/txl_pbc.py) reach val mAP50 0.754 and 0.801 (seeds 0 and 1; mAP50:95 0.551,
0.577); with pseudo-labels (`--config.pseudo_labels.enabled=True --config.pseudo_labels.threshold=0.6
--config.pseudo_labels.warmup_steps=600`) 0.790 and 0.823 (0.585, 0.600). Full labels give 0.908 at the same
budget, and treating the unlabelled area as background 0.775 and 0.784. At 600 steps (about 20 minutes): 0.616 / 0.561,
with pseudo-labels 0.633, full labels 0.803, background 0.468. At 3,600 steps (`--config.total_steps=3600`, about
30 minutes alone on session 11's faster 2-core CPU): 0.864 and 0.861 (0.93 x full labels' 0.930), with
pseudo-labels 0.875, background 0.839. Scored as one class (`cells/AP50`, finding cells whatever their class), the
region-restricted runs lead treating the unlabelled area as background: 0.933 and 0.935 against 0.868 at 3,600
steps, 0.884 and 0.901 against 0.787 and 0.859 at 1,800 (full labels 0.970, 0.958). Counting the unsure
predictions outside the region as background (`--config.loss.unlabelled_background_below=0.5
--config.loss.unlabelled_background_relative=True`): 0.790 and 0.795 mAP50 at 1,800 steps, cells AP50 0.868.
Weighting the negatives inside the region by the field's area over the region's (about 5;
`--config.loss.region_negative_weight_max=10`): 0.810 and 0.734 mAP50 at 1,800 steps, cells AP50 0.905 and 0.889,
within the spread of plain region restriction's two seeds.
"""

from configs import txl_pbc


def get_config():
  c = txl_pbc.get_config()
  c.dataset.config = 'sparse'
  return c
