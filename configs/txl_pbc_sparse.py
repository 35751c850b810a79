r"""TXL-PBC with simulated sparse labels (one fifth of each train image annotated), region-restricted matching.

  python -m lld_jax.train --config=configs/txl_pbc_sparse.py --workdir=runs/txl_pbc_sparse \
      --config.dataset.manual_dir=../shared/data/txl_pbc

Evaluated on the fully annotated val split. Compare with configs/txl_pbc.py at the same budget. Measured on 2 CPU
cores (XLA level 1) through `scripts/sparse_benchmark.py --dataset=txl_pbc --steps=300` (docs/results.md): 300
steps in about 8 minutes reach val mAP50 0.563 (mAP50:95 0.350), against 0.655 with full labels and 0.356 when the
unlabelled area is treated as background. The full 1,800 steps take about an hour (as configs/txl_pbc.py); that
run has not been measured with sparse labels.
"""

from configs import txl_pbc


def get_config():
  c = txl_pbc.get_config()
  c.dataset.config = 'sparse'
  return c
