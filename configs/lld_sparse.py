r"""Paper scale on the sparsely annotated LLD subsets (16-column layout), region-restricted matching.

  python -m lld_jax.train --config=configs/lld_sparse.py --workdir=runs/lld_sparse \
      --config.dataset.manual_dir=/path/to/LLD --config.model.pretrained=/path/to/resnet50.safetensors

Evaluated on the fully annotated sparse test split. Not yet trained on real LLD: no mAP is claimed for it.
"""

from configs import lld_full


def get_config():
  c = lld_full.get_config()
  c.dataset.config = 'sparse'
  return c
