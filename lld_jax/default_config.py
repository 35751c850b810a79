"""Defaults shared by every config in `configs/`. Each config file starts from `base_config()` and changes
what its experiment needs; the returned ConfigDict is locked by the command line, so a misspelled override fails.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 10_000
  c.per_device_batch_size = 4
  c.image_size = 640
  c.max_objects = 64
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.cache = True
  # Per device and step: crops of that many true cells, drawn from the whole training split, that train the cell
  # classifier alone (lld_jax.cell_crops; needs model.cell_crop_size and model.cell_class_refinement). 0: none.
  c.cell_crop_batch_size = 0
  # Steps of those crops (cell_crop_batch_size per device) that train the cell classifier alone before the
  # detector's first step (lld_jax.cell_head_warmup). 0: none.
  c.cell_crop_warmup_steps = 0
  # How the crops are drawn across classes: each cell with weight (its class's share of the pool) ** -this. 0: every
  # cell alike (the classes as often as in the split); 0.5: a class's share goes with the square root of its count;
  # 1: every class alike.
  c.cell_crop_class_balance = 0.0
  c.shuffle_buffer = 512

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'lld'
  c.dataset.config = 'full'
  c.dataset.manual_dir = ''  # the user's download; built into data_dir on first use
  c.dataset.data_dir = ''  # TFDS data dir ('' = TFDS default, ~/tensorflow_datasets)
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  # Sparse data: an image with no annotated region (an empty label file) adds no loss under region-restricted
  # matching without pseudo-labels on it; True leaves such images out of training then (counted and logged), so
  # every batch carries labels.
  c.dataset.skip_images_without_region = True

  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.vertical_flip = 1.0  # probability factor; films have no up or down. Never rotate by 90 degrees.
  c.augment.min_scale = 0.75
  c.augment.max_scale = 1.25
  c.augment.colour = 1.0
  # The true-cell crops (lld_jax.cell_crops) are shifted by up to this fraction of their side (0 to 0.125).
  c.augment.cell_crop_shift = 0.125

  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'resnet50'
  c.model.backbone_norm = 'frozen_bn'
  c.model.backbone_width = 64
  c.model.pretrained = ''  # torchvision ResNet checkpoint (.pth or .safetensors)
  c.model.hidden_dim = 256
  c.model.num_heads = 8
  c.model.ffn_dim = 1024
  c.model.num_encoder_layers = 1
  c.model.fusion_depth = 2  # 3x3 conv blocks per FPN/PAN fusion
  c.model.num_decoder_layers = 6
  c.model.num_queries = 300
  c.model.num_points = 4
  c.model.two_stage = True
  c.model.denoising_groups = 5
  c.model.label_noise = 0.5
  c.model.box_noise = 1.0
  c.model.attribute_head = 'query'
  c.model.roi_size = 7
  c.model.input_stride = 1  # 2: the backbone reads the image at half resolution, the cell crops at full
  c.model.cell_crop_size = 0  # >0: attribute queries also read an SxS crop of each cell's input pixels
  # What the crops' CNN reads: 'intensity' (the normalized input) or 'optical_density' (against the field's
  # background around the cell, lld_jax.optical_density).
  c.model.cell_crop_pixels = 'intensity'
  c.model.cell_class_refinement = False  # one more query on those tokens corrects the last layer's classes
  # The first denoising group's positives, which train the attribute head and the cell classifier, read their
  # cells at the true boxes instead of at their refined boxes.
  c.model.dn_cells_at_true_boxes = False
  # At evaluation the cell classifier also reads each crop flipped three ways and averages its log-probabilities.
  c.model.cell_class_flips = False
  # The attribute queries also read each cell's box size in the original image's pixels (scale jitter undone).
  c.model.attribute_box_size = False
  # A linear classifier on the cell crops' tokens also gives the attributes (added to the attribute head's), and
  # learns them from the true-cell crops (cell_crop_batch_size) and in the warm-up, as the cell classifier does.
  # In the demo: strict attribute F1 +0.012, mAP50 -0.017 on the means of three seeds (docs/results.md, session 24).
  c.model.cell_attribute_classifier = False
  # With widths, each attribute gets its own small CNN in that classifier (one 3x3 convolution of each width, at
  # stride 2), going on from the crop encoder's feature map after `cell_attribute_branch_stage` convolutions.
  c.model.cell_attribute_branch_widths = ()
  c.model.cell_attribute_branch_stage = 2
  c.model.dtype = 'float32'  # 'bfloat16' on accelerators

  c.loss = ml_collections.ConfigDict()
  c.loss.class_loss = 'varifocal'
  c.loss.class_weight = 1.0
  c.loss.l1_weight = 5.0
  c.loss.giou_weight = 2.0
  c.loss.attribute_weight = 1.0
  c.loss.cell_class_weight = 1.0  # cross-entropy of the cell-crop classifier (model.cell_class_refinement)
  c.loss.aux_loss = True
  # 'one_to_one': Hungarian matching of the selected proposals (RT-DETR). 'one_to_one_tokens': every encoder token
  # is a prediction, each cell matched to the best one (Deformable DETR's two-stage loss), so cells the selection
  # passes over are still learnt. 'one_to_many': every token, with task-aligned assignment (YOLOv8's); slower to
  # converge in our A/B (docs/results.md).
  c.loss.encoder_loss = 'one_to_one'
  c.loss.dense_top_k = 10  # positives per target in the one-to-many encoder loss
  c.loss.region_restricted = True  # False: unlabelled areas are background (what a plain detector does)
  # With region_restricted: outside the annotated region an unmatched prediction is background when its own best
  # class probability is under this (losses.counts_as_background). 0: never (neither positive nor negative).
  c.loss.unlabelled_background_below = 0.0
  # True: that threshold is a fraction of the mean score the model gives the labelled cells' own classes in the
  # batch (losses.labelled_cell_score), so it follows the model's confidence as training goes.
  c.loss.unlabelled_background_relative = False
  # With region_restricted: above 1, each image's negatives inside its annotated region weigh the field's area over
  # the region's, at most this (losses.region_negative_weight), standing in for the negatives of the unlabelled
  # area. 1: every negative weighs 1.
  c.loss.region_negative_weight_max = 1.0
  c.loss.cost_class = 2.0
  c.loss.cost_l1 = 5.0
  c.loss.cost_giou = 2.0
  c.loss.cost_attribute = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-4
  c.optimizer.backbone_lr_factor = 0.1
  c.optimizer.cell_head_lr_factor = 1.0  # the cell-crop encoder and the attribute head (train_step.CELL_HEAD_MODULES)
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.grad_clip = 0.1
  c.optimizer.ema_decay = 0.9996  # 0 disables the EMA
  c.optimizer.ema_warmup_steps = 1000

  c.pseudo_labels = ml_collections.ConfigDict()
  c.pseudo_labels.enabled = False
  c.pseudo_labels.threshold = 0.95  # on the teacher's detection score, by the rule of eval.class_scores
  c.pseudo_labels.weight = 0.1
  c.pseudo_labels.warmup_steps = 1000
  c.pseudo_labels.attributes = False
  c.pseudo_labels.max_per_image = 16
  c.pseudo_labels.duplicate_iou = 0.5  # of near-duplicate teacher boxes only the most confident is a label
  # False: no pseudo-labels on images without an annotated region, which then add no loss and, by
  # dataset.skip_images_without_region, are left out of training.
  c.pseudo_labels.on_images_without_region = True

  c.nonfinite = ml_collections.ConfigDict()
  c.nonfinite.policy = 'skip'  # 'skip' the update or 'stop' training
  c.nonfinite.max_consecutive = 20

  c.eval = ml_collections.ConfigDict()
  c.eval.max_detections = 100
  c.eval.score_threshold = 0.001
  # Per-class NMS of the detections; 1.0 turns it off. Early in training (the demo budget) it removes the
  # duplicate answers of several queries to one cell; a converged set predictor barely needs it.
  c.eval.nms_iou_threshold = 0.7
  # 'detector': the decoder's sigmoid class scores. 'cell_classifier': their geometric mean with the cell-crop
  # classifier's class probabilities (needs model.cell_crop_size and model.cell_class_refinement).
  c.eval.class_scores = 'detector'
  c.eval.attribute_score_threshold = 0.3
  # Each attribute's value: argmax of logit - s * log(prior), the prior counted on the training split (s = this;
  # 0: the plain argmax). s = 1 balances the errors across values (logit adjustment). The plain argmax of an
  # unsure model never calls a rare value (prominent vacuoles, 12 % of the cells): its F1 stays 0. With 1 the mean
  # strict attribute F1 of three synthetic runs rose by 0.05-0.07 (docs/results.md, session 18).
  c.eval.attribute_logit_adjustment = 1.0
  # 'field' or 'patient': the cell classifier's probabilities also read the other cells of the same field, or of every
  # field of the same patient (a film), through the leukemia types' class mixes counted on the training split
  # (lld_jax.class_context; LLD's names carry the patient and the type). 'none': each cell alone.
  c.eval.class_context = 'none'

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # call jax.distributed.initialize() (multi-host GPU clusters, TPU pods)
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c
