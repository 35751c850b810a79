r"""TXL-PBC with simulated sparse labels (one fifth of each train image annotated), region-restricted matching.

  python -m lld_jax.train --config=configs/txl_pbc_sparse.py --workdir=runs/txl_pbc_sparse \
      --config.dataset.manual_dir=../shared/data/txl_pbc

Evaluated on the fully annotated val split. Compare with configs/txl_pbc.py at the same budget.
"""

from configs import txl_pbc


def get_config():
  c = txl_pbc.get_config()
  c.dataset.config = 'sparse'
  return c
