r"""Paper scale on the sparsely annotated LLD subsets (16-column layout), region-restricted matching.

  python -m lld_jax.train --config=configs/lld_sparse.py --workdir=runs/lld_sparse \
      --config.dataset.manual_dir=/path/to/LLD --config.model.pretrained=/path/to/resnet50.safetensors

Evaluated on the fully annotated sparse test split. With pseudo-labels (`--config.pseudo_labels.enabled=True`) one
H200 took 71 ms per step at per-device batch 4 (56 images/s) and 4.3 GB of device memory, against 59 ms and 3.9 GB
without (`scripts/gpu_benchmark.sh`, random batches, docs/results.md). Not yet trained on real LLD: no mAP is
claimed for it.
"""

from configs import lld_full


def get_config():
  c = lld_full.get_config()
  c.dataset.config = 'sparse'
  return c
