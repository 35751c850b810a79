r"""Paper scale: all fully annotated LLD subsets, ResNet-50 at 640 px, for GPUs and TPUs.

  python -m lld_jax.train --config=configs/lld_full.py --workdir=runs/lld_full \
      --config.dataset.manual_dir=/path/to/LLD --config.model.pretrained=/path/to/resnet50.safetensors

The download is the folder with the subset folders (see tfds_lld/lld). `model.pretrained` takes a torchvision
ResNet-50 ImageNet checkpoint (.pth or .safetensors). Measured on one H200 (`scripts/gpu_benchmark.sh`, random
batches): per-device batch 4 takes 3.9 GB of device memory at 61 ms per step (66 images/s), batch 16 takes 12.9 GB
at 141 ms (113 images/s), so an 80 GB GPU holds a far larger batch than this default (docs/results.md). Not yet trained on real LLD
(it cannot be downloaded on the development machines): no mAP is claimed for it.
"""

from lld_jax.default_config import base_config


def get_config():
  c = base_config()
  c.total_steps = 60_000
  c.per_device_batch_size = 4
  c.image_size = 640
  c.max_objects = 64  # 10x fields carry many small cells
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  c.dataset.name = 'lld'
  c.dataset.config = 'full'
  c.model.backbone = 'resnet50'
  c.model.backbone_norm = 'frozen_bn'
  c.model.num_queries = 300
  c.model.dtype = 'bfloat16'
  return c
