"""Model outputs -> detections in original image pixels (numpy, on the host).

`class_scores` also runs on JAX arrays inside a jitted step: the pseudo-label teacher ranks its detections by the
same score as the evaluation and prediction.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Detections:
  boxes: np.ndarray  # [n, 4] xyxy in original pixels
  scores: np.ndarray  # [n]
  labels: np.ndarray  # [n]
  attributes: np.ndarray  # [n, A] predicted value per attribute
  attribute_confidence: np.ndarray  # [n, A] probability of the predicted value
  # [n] the decoder's best score of the detection's query: how sure the model is that a cell is there, whatever
  # its class (the attribute protocols threshold on it)
  cell_scores: np.ndarray
  queries: np.ndarray  # [n] the query each detection comes from


def array_module(x):
  """numpy for host arrays, jax.numpy for device arrays and tracers."""
  return jnp if isinstance(x, jax.Array) else np  # a tracer inside jit is a jax.Array too


def _sigmoid(x):
  return 1.0 / (1.0 + array_module(x).exp(-x))


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = array_module(x).exp(x)
  return e / e.sum(-1, keepdims=True)


def per_class_nms(boxes, scores, labels, iou_threshold, max_output) -> np.ndarray:
  """Indices kept by greedy non-maximum suppression within each class, best score first (TensorFlow's NMS).

  boxes [n, 4] xyxy. Boxes of different classes never suppress each other: each class is shifted to its own
  region of the plane before one class-agnostic call.
  """
  import tensorflow as tf  # noqa: PLC0415  (input_pipeline has already hidden the GPUs from TensorFlow)
  if not len(boxes):
    return np.zeros([0], np.int64)
  offset = (np.abs(boxes).max() + 1.0) * labels.astype(np.float64)[:, None]
  shifted = (boxes + offset)[:, [1, 0, 3, 2]]  # TensorFlow takes (y0, x0, y1, x1)
  kept = tf.image.non_max_suppression(shifted.astype(np.float32), scores.astype(np.float32), max_output,
                                      iou_threshold=iou_threshold)
  return kept.numpy().astype(np.int64)


def class_scores(logits, cell_class_logits=None):
  """Scores [Q, K] of each (query, class) pair: the decoder's sigmoids, or, given the cell classifier's logits
  [Q, K], the geometric mean of those sigmoids and the classifier's softmax probabilities.

  The decoder's score also says whether the query is the one answer to a cell and how well its box fits; the
  classifier, trained on the cell's pixels alone, knows the class better. On the demo the mean beat both the
  decoder alone and the decoder's best score times the classifier (docs/results.md).

  NumPy inputs are scored in float64, JAX arrays (also inside jit) in float32."""
  xp = array_module(logits)
  dtype = np.float64 if xp is np else jnp.float32
  scores = _sigmoid(logits.astype(dtype))
  if cell_class_logits is None:
    return scores
  return xp.sqrt(scores * _softmax(cell_class_logits.astype(dtype)))


CLASS_SCORE_RULES = ('detector', 'cell_classifier')


def attribute_offsets(counts, num_values, strength):
  """Offsets [A, V] added to the attribute logits before the argmax: -strength * log(prior of the value).

  counts [A, V]: how often each value of each attribute occurs among the training cells; num_values[a]: how many
  of the V slots attribute a uses (the others, padding, get 0). The prior is add-one smoothed, so a value never
  seen in training is not forced. With strength 1 the argmax of logit + offset is the decision that minimizes the
  balanced error (logit adjustment, Menon et al. 2021); with 0 it is the plain argmax, which for a rare value
  (prominent vacuoles, 12 % of the cells) can mean never predicting it at all.
  """
  counts = np.asarray(counts, np.float64)
  valid = np.arange(counts.shape[1])[None, :] < np.asarray(num_values)[:, None]
  counts = np.where(valid, counts, 0.0)
  prior = (counts + 1.0) / (counts.sum(-1, keepdims=True) + np.asarray(num_values, np.float64)[:, None])
  return np.where(valid, -float(strength) * np.log(prior), 0.0)


def attribute_values(attribute_logits, offsets=None):
  """The decided value [..., A] of each attribute: argmax over V of attribute_logits [..., A, V] plus `offsets`
  [A, V] (`attribute_offsets`; None: the plain argmax)."""
  return (attribute_logits if offsets is None else attribute_logits + offsets).argmax(-1)


def cell_scores(logits):
  """Each query's confidence that it found a cell, whatever its class: its best sigmoid [...] of logits [..., K]."""
  return _sigmoid(np.asarray(logits, np.float64)).max(-1)


def cell_classifier_logits(outputs, rule):
  """The cell classifier's logits [..., Q, K] from a batch of model outputs when `rule` (eval.class_scores)
  asks for them, else None."""
  if rule not in CLASS_SCORE_RULES:
    raise ValueError(f'eval.class_scores={rule!r}: expected one of {CLASS_SCORE_RULES}')
  if rule == 'detector':
    return None
  if 'cell_class_logits' not in outputs:
    raise ValueError('eval.class_scores=cell_classifier needs a model with a cell classifier '
                     '(model.cell_crop_size > 0 and model.cell_class_refinement=True)')
  return outputs['cell_class_logits']


def to_detections(logits, boxes, attribute_logits, canvas_size, scale, original_size, max_detections=100,
                  score_threshold=0.0, nms_iou_threshold=None, cell_class_logits=None,
                  attribute_logit_offsets=None) -> Detections:
  """One image's detections: the top-scoring (query, class) pairs, boxes mapped back to the original pixels.

  logits [Q, K]; boxes [Q, 4] normalized cxcywh on the square canvas of side `canvas_size`; scale = canvas pixels
  per original pixel; original_size = (height, width). A query may give several classes (DETR's top-k), each with
  that query's attributes; `cell_class_logits` switches the scores to `class_scores`'s geometric mean. With
  `nms_iou_threshold`, a pair is dropped when a higher-scoring pair of the same class overlaps it by more than
  that IoU: a set predictor early in training still answers one cell with several queries, and those duplicates
  are false positives that would also crowd real cells out of the top `max_detections`.
  Each attribute's value is the argmax of its logits plus `attribute_logit_offsets` [A, V] (`attribute_offsets`;
  none: the plain argmax); its confidence is the model's own probability of that value.
  """
  num_queries, num_classes = logits.shape
  scores = class_scores(logits, cell_class_logits).ravel()
  query_scores = cell_scores(logits)
  top = np.argsort(-scores, kind='stable')
  top = top[scores[top] > score_threshold]
  query, label = np.divmod(top, num_classes)
  cx, cy, w, h = np.moveaxis(boxes[query].astype(np.float64), -1, 0)
  xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * canvas_size / scale
  height, width = original_size
  xyxy = np.clip(xyxy, 0, [width, height, width, height])
  keep = np.arange(min(max_detections, len(top)))
  if nms_iou_threshold is not None and nms_iou_threshold < 1.0:  # IoU never exceeds 1: nothing to suppress
    keep = per_class_nms(xyxy, scores[top], label, nms_iou_threshold, max_detections)
  top, query, label, xyxy = top[keep], query[keep], label[keep], xyxy[keep]
  attribute_logits = attribute_logits[query].astype(np.float64)
  probs = _softmax(attribute_logits)
  attributes = attribute_values(attribute_logits, attribute_logit_offsets)
  confidence = np.take_along_axis(probs, attributes[..., None], -1)[..., 0]
  return Detections(boxes=xyxy, scores=scores[top], labels=label.astype(np.int64),
                    attributes=attributes, attribute_confidence=confidence,
                    cell_scores=query_scores[query], queries=query)


def one_per_cell(found: Detections, min_cell_score: float, iou_threshold: float = 0.7) -> Detections:
  """What a person reads: each cell once, with its most likely class.

  Keeps each query's best-scoring class, drops queries whose box overlaps a better one's by more than
  `iou_threshold` whatever the class (duplicates of one cell), then the cells whose cell score is below
  `min_cell_score`. A cell stays even when its class is uncertain (a low class score): that it is there is
  what the cell score says. `found` must be sorted by descending score, as `to_detections` returns it.
  """
  _, first = np.unique(found.queries, return_index=True)
  keep = np.sort(first)
  if iou_threshold < 1.0 and len(keep):
    keep = keep[per_class_nms(found.boxes[keep], found.scores[keep], np.zeros(len(keep), np.int64), iou_threshold,
                              len(keep))]
  keep = keep[found.cell_scores[keep] >= min_cell_score]
  return Detections(**{field.name: getattr(found, field.name)[keep] for field in dataclasses.fields(found)})
