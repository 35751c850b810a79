r"""The demo: a small detector on the synthetic LLD download, on a CPU in minutes.

  python -m tfds_lld.synthetic --out demo_run/download --layout coco --subsets H_100x_C1,L_100x_C2 \
      --patients 20 --images-per-patient 12 --seed 0 --workers 2
  python -m lld_jax.train --config=configs/synthetic_demo.py --workdir=demo_run/train \
      --config.dataset.manual_dir=demo_run/download --config.dataset.data_dir=demo_run/tfds

(`bash scripts/demo.sh` runs all of it, then prediction and the report, with XLA's CPU optimization level 1.)
Expected on 2 CPU cores: 0.75-0.85 steps/s after about 1.3 minutes of start-up (mostly compilation), 8-9.5 minutes of
training; test mAP50 0.47, mAP50:95 0.31 and strict attribute F1 0.545. `bash scripts/demo.sh` from a fresh clone
of de0d91c (set-up with uv, generation on both cores) reached exactly those (0.472, 0.311, 0.545) in 13.5 minutes,
in a slow hour of the machine (0.75-0.77 steps/s); with pip's set-up, fresh clones took 14.4-15.9 minutes
(docs/results.md). A faster CPU (AVX-512, 3.3 steps/s) ran it in 4.1 minutes, to 0.453 / 0.298 / 0.561: the
digits depend on the CPU. The issue's quality targets (mAP50 0.90, F1 0.85) are out of reach: a crop classifier
given the true boxes reaches 0.84 / 0.76 on this data in a comparable budget, and 0.83 / 0.85 with five times that
budget (`scripts/oracle_boxes.py`): the mAP50 target is above what this data's classes allow.
"""

from lld_jax.default_config import base_config


def get_config():
  c = base_config()
  c.total_steps = 420
  c.per_device_batch_size = 4
  c.image_size = 256
  c.max_objects = 8  # the demo fields hold at most 6 cells; more would only pad the denoising groups
  c.log_every_steps = 20
  c.eval_every_steps = 420  # the final evaluation only: every second counts in a 15-minute demo
  c.checkpoint_every_steps = 100
  c.dataset.name = 'lld'
  c.dataset.config = 'full'
  c.dataset.manual_dir = 'demo_run/download'
  c.dataset.data_dir = 'demo_run/tfds'
  c.augment.colour = 0.5  # the classes differ by stain: full-strength colour jitter blurred them (session 7 A/B)
  c.model.backbone = 'resnet18'
  c.model.backbone_norm = 'group_norm'  # no pretrained weights on the demo machine
  c.model.backbone_width = 32
  c.model.cell_crop_size = 32
  c.model.cell_class_refinement = True
  c.model.dn_cells_at_true_boxes = True  # the cell classifier learns from crops of cells from the first step
  c.model.hidden_dim = 96
  c.model.num_heads = 4
  c.model.ffn_dim = 384
  c.model.fusion_depth = 1
  c.model.num_decoder_layers = 3
  c.model.num_queries = 30
  c.model.denoising_groups = 4
  c.eval.class_scores = 'cell_classifier'
  c.optimizer.learning_rate = 5e-4
  c.optimizer.backbone_lr_factor = 1.0  # trained from scratch
  c.optimizer.cell_head_lr_factor = 4.0  # 2e-3: a small CNN on crops wants it; the decoder does not
  c.optimizer.warmup_steps = 50
  c.optimizer.ema_decay = 0.998
  c.optimizer.ema_warmup_steps = 100
  return c
