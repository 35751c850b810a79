"""The tiny training config of the end-to-end and reliability tests: seconds per run on a CPU."""

from configs import synthetic_demo


def tiny_config(download, data_dir):
  c = synthetic_demo.get_config()
  c.total_steps = 4
  c.per_device_batch_size = 1
  c.image_size = 64
  c.max_objects = 8
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.shuffle_buffer = 8
  c.dataset.manual_dir = str(download)
  c.dataset.data_dir = str(data_dir)
  c.model.backbone_width = 8
  c.model.hidden_dim = 32
  c.model.num_heads = 2
  c.model.ffn_dim = 64
  c.model.num_decoder_layers = 1
  c.model.num_queries = 8
  c.model.denoising_groups = 1
  c.model.roi_size = 3
  c.eval.max_detections = 8
  return c
