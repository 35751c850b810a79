r"""Prediction on image files: `python -m lld_jax.predict --workdir=DIR --images=PATH_OR_GLOB --out=OUT
[--config=configs/NAME.py] [--score_threshold=0.3] [--batch_size=8]`.

Restores the best checkpoint of DIR (else the latest; EMA weights when the config keeps an EMA) with the config
the training saved in DIR/config.json (or --config), and runs the detector on a file, every image of a directory
(.png/.jpg/.jpeg/.bmp/.tif/.tiff, sorted, not recursive) or a glob (`**` recurses). Images of any size and aspect
ratio are resized exactly as in evaluation (aspect kept, scale = image_size / max(H, W), padded at the bottom and
right) and the boxes are mapped back to the original pixels. Writes

  OUT/detections.json  COCO results, one per cell (its most likely class): image_id, file_name, category_id
                       (class index + 1), category_name, bbox [x, y, w, h] in original pixels, score (of the
                       class), cell_score (that a cell is there), attributes {name: value}, attribute_scores
                       (left out for a model trained without attributes, `loss.attribute_weight` 0); each
                       value decided as in evaluation (`eval.attribute_logit_adjustment`, with the training
                       counts in DIR/attribute_counts.json), its score the model's probability of that value;
                       with `eval.class_context`, the class also reads the other cells of the image or of the
                       images of the same patient (LLD names, DIR/class_context.json), as in evaluation
  OUT/images.json      {image_id: {file_name, width, height}}
  OUT/skipped.json     [{file, reason}] for unreadable or non-image files (also one stderr line each)
  OUT/overlays/<stem>.png  the image (upscaled to >= 1024 px) with numbered boxes, and a legend panel listing
                       each cell's class, score and attribute values

image_id is the position in the sorted input list (skipped files keep their position). The process exits with 0
when at least one image was processed, else 1.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import ImageOps

from lld_jax import postprocess
from tfds_lld import lld_format

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')

# Short words for the overlay, in ATTRIBUTE_NAMES order; same order as lld_format.ATTRIBUTE_VALUES.
SHORT_VALUES = (
    ('small', 'medium', 'large'),  # cell_size
    ('open', 'coarse'),  # nuclear_chromatin
    ('regular', 'irregular'),  # nuclear_shape
    ('nucleolus-', 'nucleolus+'),  # nucleolus
    ('scanty', 'abundant'),  # cytoplasm
    ('slight', 'moderate'),  # cytoplasmic_basophilia
    ('vac-', 'vac+'),  # cytoplasmic_vacuoles
)
SHORT_NAMES = ('size', 'chromatin', 'nucleus', 'nucleolus', 'cytoplasm', 'basophilia', 'vacuoles')
assert tuple(len(v) for v in SHORT_VALUES) == lld_format.NUM_ATTRIBUTE_VALUES

# Distinct, print-safe colours (Tableau 20 reordered so neighbouring class indices differ strongly).
_PALETTE = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207),
    (227, 119, 194), (140, 86, 75), (188, 189, 34), (127, 127, 127), (174, 199, 232), (255, 152, 150),
    (152, 223, 138), (255, 187, 120), (197, 176, 213), (158, 218, 229), (247, 182, 210), (196, 156, 148),
)


def class_colour(label: int) -> tuple[int, int, int]:
  return _PALETTE[int(label) % len(_PALETTE)]


class ImageLoadError(ValueError):
  """A file that is not a readable image."""


# ----------------------------------------------------------------------------------------------- pure functions


def load_image(path) -> np.ndarray:
  """The image at `path` as uint8 RGB [H, W, 3] (EXIF orientation applied; greyscale, palette, 16-bit and
  alpha images converted; transparent pixels composited on white). Raises ImageLoadError naming the file."""
  path = os.fspath(path)
  try:
    with Image.open(path) as image:
      image.load()  # decode everything now, so truncated files fail here
      image = ImageOps.exif_transpose(image)
      if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        array = np.asarray(image, np.float64)
        top = array.max()
        array = array / (top if top > 255 else 255.0) * 255.0
        return np.repeat(np.clip(np.round(array), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
      if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
      array = np.asarray(image.convert('RGB'), np.uint8)
  except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
    raise ImageLoadError(f'{path}: not a readable image ({type(error).__name__}: {error})') from error
  if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
    raise ImageLoadError(f'{path}: empty image of shape {array.shape}')
  return np.ascontiguousarray(array)


def fit_scale(height: int, width: int, image_size: int) -> float:
  """Canvas pixels per original pixel, computed in float32 like `input_pipeline.preprocess`."""
  return float(np.float32(image_size) / np.float32(max(height, width)))


def prepare(image: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray, float]:
  """uint8 RGB [H, W, 3] -> (normalized canvas [S, S, 3] float32, image mask [S, S] float32, scale).

  The same arithmetic as the evaluation branch of `input_pipeline.preprocess`: resize by
  scale = S / max(H, W) to round(H * scale) x round(W * scale) (bilinear, antialiased), pad with black at the
  bottom and right, then normalize with the ImageNet mean and std (so padding is -mean/std, as in training);
  the mask is 1 on the real pixels.
  """
  import tensorflow as tf  # noqa: F401  (input_pipeline hides the GPUs from TensorFlow first)
  from lld_jax import input_pipeline

  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image [H, W, 3], got shape {image.shape}')
  height, width = image.shape[:2]
  scale32 = np.float32(image_size) / np.float32(max(height, width))
  new_h = max(int(np.round(np.float32(height) * scale32)), 1)
  new_w = max(int(np.round(np.float32(width) * scale32)), 1)
  new_h, new_w = min(new_h, image_size), min(new_w, image_size)
  resized = tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w], antialias=True).numpy()
  canvas = np.zeros((image_size, image_size, 3), np.float32)
  canvas[:new_h, :new_w] = resized
  mask = np.zeros((image_size, image_size), np.float32)
  mask[:new_h, :new_w] = 1.0
  mean = np.asarray(input_pipeline.IMAGENET_MEAN, np.float32)
  std = np.asarray(input_pipeline.IMAGENET_STD, np.float32)
  canvas = ((canvas / np.float32(255.0) - mean) / std).astype(np.float32)
  return canvas, mask, float(scale32)


def find_images(images: str) -> tuple[list[str], str | None]:
  """The sorted input list for --images, and the folder that file names are written relative to."""
  if os.path.isdir(images):
    names = sorted(n for n in os.listdir(images)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(images, n)))
    return [os.path.join(images, n) for n in names], images
  if os.path.isfile(images):
    return [images], None
  matches = sorted(p for p in glob.glob(images, recursive=True) if os.path.isfile(p))
  return matches, None


def attribute_dicts(attributes: np.ndarray, confidence: np.ndarray) -> tuple[dict, dict]:
  values = {name: lld_format.ATTRIBUTE_VALUES[a][int(attributes[a])]
            for a, name in enumerate(lld_format.ATTRIBUTE_NAMES)}
  scores = {name: round(float(confidence[a]), 4) for a, name in enumerate(lld_format.ATTRIBUTE_NAMES)}
  return values, scores


def short_attributes(attributes: dict) -> str:
  """'large, open, irregular, nucleolus+, scanty, moderate, vac-' from {attribute_name: value_name}."""
  words = []
  for a, name in enumerate(lld_format.ATTRIBUTE_NAMES):
    value = attributes.get(name)
    if value in lld_format.ATTRIBUTE_VALUES[a]:
      words.append(SHORT_VALUES[a][lld_format.ATTRIBUTE_VALUES[a].index(value)])
    else:
      words.append('?')
  return ', '.join(words)


def detection_records(found: postprocess.Detections, image_id: int, file_name: str,
                      class_names: Sequence[str], with_attributes: bool = True) -> list[dict]:
  """COCO-results entries for one image's detections (boxes already in original pixels). Without
  `with_attributes` (a model whose attribute head was never trained) the entries carry no attributes."""
  records = []
  for i in range(len(found.scores)):
    x0, y0, x1, y1 = (float(v) for v in found.boxes[i])
    label = int(found.labels[i])
    record = {
        'image_id': int(image_id), 'file_name': file_name, 'category_id': label + 1,
        'category_name': class_names[label] if label < len(class_names) else f'class_{label}',
        'bbox': [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        'score': round(float(found.scores[i]), 5), 'cell_score': round(float(found.cell_scores[i]), 5)}
    if with_attributes:
      record['attributes'], record['attribute_scores'] = attribute_dicts(found.attributes[i],
                                                                         found.attribute_confidence[i])
    records.append(record)
  return records


def trained_attributes(config) -> bool:
  """Whether the model learnt attributes: a config with `loss.attribute_weight` 0 (TXL-PBC has none) leaves the
  attribute head at its random initialization, whose outputs mean nothing."""
  return float(config.get('loss', {}).get('attribute_weight', 1.0)) > 0


# ------------------------------------------------------------------------------------------------------ overlay


def _font(size: int):
  try:
    from matplotlib import font_manager
    return ImageFont.truetype(font_manager.findfont('DejaVu Sans'), size)
  except Exception:  # pylint: disable=broad-except
    return ImageFont.load_default(size=size)


def _text_colour(background) -> tuple[int, int, int]:
  r, g, b = background[:3]
  return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _dark(colour) -> tuple[int, int, int]:
  """The class colour darkened until it reads as text on white."""
  r, g, b = colour[:3]
  lum = 0.299 * r + 0.587 * g + 0.114 * b
  factor = min(1.0, 110.0 / max(lum, 1.0))
  return tuple(int(c * factor) for c in (r, g, b))


def draw_overlay(image: np.ndarray, detections: Sequence[dict], class_names: Sequence[str], path,
                 min_long_side: int = 1024, max_long_side: int = 2048, title: str | None = None) -> str:
  """Writes a PNG: the image (upscaled so its long side is >= min_long_side) with one numbered box per
  detection in its class colour, and a legend panel on the right listing '#n Class score | attribute words'.

  `detections` are COCO-results entries in original pixels (as in detections.json): bbox [x, y, w, h],
  category_id (class index + 1), score and optionally attributes {name: value}. Numbers follow the list order.
  Entries without attributes are listed as '#n Class score', and without any the attribute key is left out.
  """
  image = np.asarray(image)
  height, width = image.shape[:2]
  long_side = max(height, width)
  zoom = max(min_long_side / long_side, 1.0)
  if long_side * zoom > max_long_side:
    zoom = max_long_side / long_side
  disp_w, disp_h = max(int(round(width * zoom)), 1), max(int(round(height * zoom)), 1)
  shown = Image.fromarray(image.astype(np.uint8)).resize(
      (disp_w, disp_h), Image.Resampling.LANCZOS if zoom < 1 else Image.Resampling.BICUBIC)
  disp_long = max(disp_w, disp_h)
  font_size = max(14, int(round(disp_long / 64)))
  font = _font(font_size)
  small = _font(max(12, int(round(font_size * 0.85))))
  bold = _font(int(round(font_size * 1.1)))
  line_h = int(round(font_size * 1.45))
  pad = max(4, font_size // 3)
  box_width = max(2, int(round(disp_long / 400)))

  # Legend lines.
  header = title or ''
  lines = []
  for n, det in enumerate(detections, 1):
    label = int(det['category_id']) - 1
    name = det.get('category_name') or (class_names[label] if 0 <= label < len(class_names) else f'class_{label}')
    attributes = det.get('attributes')
    lines.append((n, label, f'{name} {det["score"]:.2f}', short_attributes(attributes) if attributes else None))
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  text_w = lambda text, f=font: int(np.ceil(measure.textlength(text, font=f)))
  tag_w = text_w(f'#{max(len(lines), 1)}') + 2 * pad
  key = 'attributes: ' + ', '.join(SHORT_NAMES) if any(a is not None for *_, a in lines) else None
  text = lambda c, a: c if a is None else f'{c} | {a}'
  legend_w = max([text_w(header, bold), text_w(key or '', small), text_w('no cells above the score threshold')] +
                 [tag_w + pad + text_w(text(c, a)) for _, _, c, a in lines]) + 3 * pad
  legend_h = pad + (1 + (key is not None) + max(len(lines), 1)) * line_h + 2 * pad
  total_h = max(disp_h, legend_h)
  out = Image.new('RGB', (disp_w + legend_w, total_h), (255, 255, 255))
  out.paste(shown, (0, 0))
  draw = ImageDraw.Draw(out)

  # Boxes, then number tags on top (outside the box above it when there is room, else inside).
  for det, (n, label, _, _) in zip(detections, lines):
    x, y, w, h = (float(v) * zoom for v in det['bbox'])
    draw.rectangle([x, y, x + w, y + h], outline=class_colour(label), width=box_width)
  placed = []  # tag rectangles so far: a tag that would cover one moves right (same box, several classes)
  for det, (n, label, _, _) in zip(detections, lines):
    x, y, w, h = (float(v) * zoom for v in det['bbox'])
    tag = str(n)
    tw, th = text_w(tag) + 2 * pad, line_h
    tx = min(max(x, 0), disp_w - tw)
    ty = y - th if y - th >= 0 else min(y + h, disp_h - th)
    for _ in range(len(placed)):
      hit = [p for p in placed if tx < p[2] and p[0] < tx + tw and ty < p[3] and p[1] < ty + th]
      if not hit:
        break
      tx = max(p[2] for p in hit) + 1
      if tx + tw > disp_w:
        tx, ty = min(max(x, 0), disp_w - tw), ty + th + 1
    placed.append((tx, ty, tx + tw, ty + th))
    colour = class_colour(label)
    draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour, outline=(0, 0, 0), width=1)
    draw.text((tx + pad, ty + th / 2), tag, fill=_text_colour(colour), font=font, anchor='lm')

  # Legend panel.
  x0 = disp_w + pad
  draw.line([(disp_w, 0), (disp_w, total_h)], fill=(160, 160, 160), width=1)
  y = pad
  draw.text((x0, y + line_h / 2), header, fill=(0, 0, 0), font=bold, anchor='lm')
  y += line_h
  if key is not None:
    draw.text((x0, y + line_h / 2), key, fill=(90, 90, 90), font=small, anchor='lm')
    y += line_h
  if not lines:
    draw.text((x0, y + line_h / 2), 'no cells above the score threshold', fill=(0, 0, 0), font=font, anchor='lm')
  for n, label, cls, attrs in lines:
    colour = class_colour(label)
    draw.rectangle([x0, y + 2, x0 + tag_w, y + line_h - 2], fill=colour, outline=(0, 0, 0), width=1)
    draw.text((x0 + tag_w / 2, y + line_h / 2), str(n), fill=_text_colour(colour), font=font, anchor='mm')
    tx = x0 + tag_w + pad
    draw.text((tx, y + line_h / 2), cls, fill=_dark(colour), font=font, anchor='lm')
    if attrs is not None:
      draw.text((tx + text_w(cls), y + line_h / 2), f' | {attrs}', fill=(0, 0, 0), font=font, anchor='lm')
    y += line_h
  path = os.fspath(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  out.save(path)
  return path


# --------------------------------------------------------------------------------------------- model and config


def load_config(workdir, config=None):
  """`config` (a ConfigDict, or a path to a configs/*.py file or a .json) or else DIR/config.json."""
  import ml_collections
  if config is not None and not isinstance(config, (str, os.PathLike)):
    return config
  path = os.fspath(config) if config is not None else os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no config: {path} does not exist (train writes DIR/config.json; or pass --config)')
  if path.endswith('.py'):
    spec = importlib.util.spec_from_file_location('_predict_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_num_classes(manager) -> int | None:
  """The number of classes of the checkpoint's class head, from the checkpoint metadata (None if unknown)."""
  import orbax.checkpoint as ocp
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      meta = ocp.StandardCheckpointer().metadata(
          os.path.join(os.fspath(manager.directory), str(manager.latest_step()), 'default'))
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    params = tree['params']
    heads = sorted(k for k in params if str(k).startswith('class_head'))
    return int(params[heads[-1]]['bias'].shape[0])
  except Exception:  # pylint: disable=broad-except
    return None


def class_names_for(config, workdir, num_classes: int | None) -> tuple[str, ...]:
  """Class names of the training data set: LLD's own; else the TFDS builder's; else DIR/class_names.json;
  else 'class_<i>'. A source whose count differs from the checkpoint's class head is passed over."""
  fits = lambda names: names and (num_classes is None or len(names) == num_classes)
  name = config.dataset.get('name', '')
  if name == 'lld' and fits(lld_format.CLASS_NAMES):
    return tuple(lld_format.CLASS_NAMES)
  if name:
    try:
      from lld_jax import input_pipeline
      import tensorflow_datasets as tfds
      import tfds_lld.lld  # noqa: F401  (registers the builders)
      import tfds_lld.txl_pbc  # noqa: F401
      data_dir = config.dataset.get('data_dir', '') or None
      try:  # a prepared data set
        builder = input_pipeline.load_builder(name, config.dataset.get('config', ''), data_dir, None)
      except FileNotFoundError:  # not built here: the builder's code still knows its features
        builder = tfds.builder(f'{name}/{config.dataset.get("config", "")}', data_dir=data_dir)
      names = tuple(input_pipeline.dataset_info(builder).class_names)
      if fits(names):
        return names
    except Exception as error:  # pylint: disable=broad-except
      print(f'note: class names not read from TFDS builder {name!r}: {error}', file=sys.stderr)
  path = os.path.join(workdir, 'class_names.json')
  if os.path.exists(path):
    with open(path) as f:
      names = tuple(str(n) for n in json.load(f))
    if fits(names):
      return names
  count = num_classes if num_classes is not None else len(lld_format.CLASS_NAMES)
  return tuple(f'class_{i}' for i in range(count))


def restore_model(config, workdir, num_classes: int):
  """Model and inference variables (EMA when the config keeps one) from DIR/best, else DIR/checkpoints."""
  from lld_jax import evaluate
  from lld_jax import train
  model, state = evaluate.restore_for_inference(config, workdir, num_classes)
  return model, train.model_variables(state, use_ema=config.optimizer.get('ema_decay', 0) > 0)


@dataclasses.dataclass
class _Item:
  image_id: int
  path: str
  file_name: str
  image: np.ndarray
  canvas: np.ndarray
  mask: np.ndarray
  scale: float
  height: int
  width: int


def _attribute_offsets(config, workdir):
  """(offsets for `postprocess.to_detections`, the rule in words) from the run's training counts
  (DIR/attribute_counts.json) and `eval.attribute_logit_adjustment`, as `lld_jax.evaluate` decides."""
  from lld_jax import evaluate
  strength = evaluate.attribute_logit_adjustment(config)
  if not strength:
    return None, 'argmax'
  path = os.path.join(workdir, evaluate.ATTRIBUTE_COUNTS_FILE)
  if not os.path.exists(path):
    print(f'warning: {path} does not exist (a run from before it was written): the attributes are the plain '
          f'argmax, not adjusted by their training prior as eval.attribute_logit_adjustment={strength:g} asks',
          file=sys.stderr)
    return None, f'argmax ({evaluate.ATTRIBUTE_COUNTS_FILE} missing)'
  counts = evaluate.read_attribute_counts(path)
  return evaluate.attribute_logit_offsets(config, counts), f'logit adjustment {strength:g} by the training prior'


def _class_context(mode, workdir, class_names):
  """(the type mix for `class_context.in_context` or None, the rule in words) from the run's training counts
  (DIR/class_context.json) and `eval.class_context` (`mode`), as `lld_jax.evaluate` decides."""
  from lld_jax import class_context
  if mode == 'none':
    return None, 'each cell alone'
  path = os.path.join(workdir, class_context.COUNTS_FILE)
  if not os.path.exists(path):
    print(f'warning: {path} does not exist (a run from before it was written): each cell is classified alone, not '
          f'in its {mode}\'s context as eval.class_context={mode} asks', file=sys.stderr)
    return None, f'each cell alone ({class_context.COUNTS_FILE} missing)'
  return class_context.type_mix(*class_context.read_counts(path, class_names)), f'in the context of its {mode}'


def _load_items(paths, names, image_size, skipped):
  for image_id, (path, name) in enumerate(zip(paths, names)):
    try:
      image = load_image(path)
      canvas, mask, scale = prepare(image, image_size)
    except Exception as error:  # pylint: disable=broad-except
      reason = str(error)
      prefix = f'{path}: '
      reason = reason[len(prefix):] if reason.startswith(prefix) else reason
      print(f'skipped {path}: {reason}', file=sys.stderr)
      skipped.append({'image_id': image_id, 'file': path, 'reason': reason})
      continue
    yield _Item(image_id, path, name, image, canvas, mask, scale, *image.shape[:2])


def _batches(items, size):
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _overlay_names(names):
  """overlays/<stem>.png, with _<image_id> added where stems collide."""
  stems = [os.path.splitext(os.path.basename(n))[0] for n in names]
  counts = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [f'{s}_{i}.png' if counts[s] > 1 else f'{s}.png' for i, s in enumerate(stems)]


def run(workdir, images, out, config=None, score_threshold: float = 0.3, batch_size: int = 8,
        overlays: bool = True) -> dict:
  """Predicts on `images` (file, directory or glob) with the model in `workdir`; writes OUT (see module doc).

  Returns a summary: num_inputs, num_images (processed), num_detections, skipped [{image_id, file, reason}],
  attribute_decisions (how the attribute values were chosen, in words), class_decisions (whether each cell was
  classified alone or in its field's or film's context, in words),
  class_names, overlays [paths] and detections_path, images_path, skipped_path."""
  import jax
  from lld_jax import sharding
  from lld_jax import train

  config = load_config(workdir, config)
  paths, root = find_images(images)
  if not paths:
    raise FileNotFoundError(f'--images={images}: no image files found')
  names = [os.path.relpath(p, root) if root else p for p in paths]
  overlay_names = _overlay_names(names)
  from lld_jax import evaluate
  manager = evaluate.checkpoint_manager(workdir, config)
  num_classes = checkpoint_num_classes(manager)
  class_names = class_names_for(config, workdir, num_classes)
  model, variables = restore_model(config, workdir, num_classes or len(class_names))
  image_size = int(config.image_size)
  max_detections = int(config.get('eval', {}).get('max_detections', 100))
  nms_iou_threshold = float(config.get('eval', {}).get('nms_iou_threshold', 1.0))
  score_rule = config.get('eval', {}).get('class_scores', 'detector')
  with_attributes = trained_attributes(config)
  attribute_offsets, attribute_rule = (_attribute_offsets(config, workdir) if with_attributes
                                       else (None, 'none (the model learnt no attributes)'))
  num_devices = jax.local_device_count()
  per_device = max(int(batch_size), 1)
  global_batch = num_devices * per_device
  p_predict = jax.pmap(functools.partial(train.predict_step, model=model), axis_name=train.AXIS)
  replicated = sharding.replicate(variables)

  from lld_jax import class_context
  context_mode = class_context.mode_of(config)
  context_mix, context_rule = _class_context(context_mode, workdir, class_names)
  os.makedirs(out, exist_ok=True)
  overlay_dir = os.path.join(out, 'overlays')
  skipped, results, image_table, overlay_paths = [], [], {}, []
  done = []  # (item without its pixels, its outputs): the class context reads the other fields of a film first
  for batch in _batches(_load_items(paths, names, image_size, skipped), global_batch):
    stacked = {'image': np.stack([b.canvas for b in batch]), 'image_mask': np.stack([b.mask for b in batch]),
               'scale': np.array([b.scale for b in batch], np.float32)}
    fill = global_batch - len(batch)  # pad to a full batch with copies of the first: one compiled shape for every call
    inputs = {k: np.concatenate([v, np.repeat(v[:1], fill, 0)]).reshape(num_devices, per_device, *v.shape[1:])
              for k, v in stacked.items()}
    outputs = jax.device_get(p_predict(replicated, sharding.shard(inputs)))
    outputs = {k: np.asarray(v).reshape(global_batch, *v.shape[2:]) for k, v in outputs.items()}
    for i, item in enumerate(batch):
      pixels_dropped = dataclasses.replace(item, canvas=None, mask=None, image=None)
      done.append((pixels_dropped, {k: v[i] for k, v in outputs.items()}))
  cell_class_logits = [postprocess.cell_classifier_logits(o, score_rule) for _, o in done]
  if context_mix is not None:
    cell_class_logits, alone = class_context.in_context(
        cell_class_logits, [o['logits'] for _, o in done], [class_context.patient_of(i.file_name) for i, _ in done],
        context_mode, context_mix)
    if alone:
      print(f'warning: eval.class_context=patient: {alone} of {len(done)} images name no patient '
            f'({{patient}}_{{image}}_{{mag}}_{{type}}); each is its own film', file=sys.stderr)
  for (item, outputs), cell_logits in zip(done, cell_class_logits):
    found = postprocess.one_per_cell(postprocess.to_detections(
        outputs['logits'], outputs['boxes'], outputs['attribute_logits'], image_size, item.scale,
        (item.height, item.width), max_detections, 0.0, nms_iou_threshold, cell_logits, attribute_offsets),
        score_threshold, nms_iou_threshold)
    records = detection_records(found, item.image_id, item.file_name, class_names, with_attributes)
    results.extend(records)
    image_table[str(item.image_id)] = {'file_name': item.file_name, 'width': int(item.width),
                                       'height': int(item.height)}
    if overlays:
      title = f'{item.file_name}: {len(records)} cell{"s" if len(records) != 1 else ""} (cell score >= ' \
              f'{score_threshold:g})'
      overlay_paths.append(draw_overlay(load_image(item.path), records, class_names,
                                        os.path.join(overlay_dir, overlay_names[item.image_id]), title=title))

  written = {}
  for name, value in (('detections', results), ('images', image_table), ('skipped', skipped)):
    written[f'{name}_path'] = os.path.join(out, f'{name}.json')
    with open(written[f'{name}_path'], 'w') as f:
      json.dump(value, f, indent=1)
  return {'num_inputs': len(paths), 'num_images': len(image_table), 'num_detections': len(results),
          'skipped': skipped, 'attribute_decisions': attribute_rule, 'class_decisions': context_rule,
          'class_names': list(class_names),
          'overlays': overlay_paths, **written}


# ------------------------------------------------------------------------------------------------------------ CLI


def _define_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'Training directory with config.json and checkpoints.')
  flags.DEFINE_string('images', None, 'An image file, a directory of images, or a glob.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('config', None, 'Config file (configs/NAME.py or .json); default DIR/config.json.')
  flags.DEFINE_float('score_threshold', 0.3, 'Keep the cells whose cell score (the confidence that a cell is '
                     'there, whatever its class) is at least this.')
  flags.DEFINE_integer('batch_size', 8, 'Images per device per step.')
  flags.mark_flags_as_required(['workdir', 'images', 'out'])


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  summary = run(f.workdir, f.images, f.out, config=f.config, score_threshold=f.score_threshold,
                batch_size=f.batch_size)
  print(f'{summary["num_images"]} of {summary["num_inputs"]} images, {summary["num_detections"]} detections, '
        f'{len(summary["skipped"])} skipped; wrote {f.out}/detections.json, images.json, skipped.json and '
        f'{len(summary["overlays"])} overlays')
  sys.exit(0 if summary['num_images'] > 0 else 1)


if __name__ == '__main__':
  from absl import app
  _define_flags()
  app.run(main)
