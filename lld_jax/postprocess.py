"""Model outputs -> detections in original image pixels (numpy, on the host)."""

import dataclasses

import numpy as np


@dataclasses.dataclass
class Detections:
  boxes: np.ndarray  # [n, 4] xyxy in original pixels
  scores: np.ndarray  # [n]
  labels: np.ndarray  # [n]
  attributes: np.ndarray  # [n, A] predicted value per attribute
  attribute_confidence: np.ndarray  # [n, A] probability of the predicted value


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
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


def to_detections(logits, boxes, attribute_logits, canvas_size, scale, original_size, max_detections=100,
                  score_threshold=0.0, nms_iou_threshold=None) -> Detections:
  """One image's detections: the top-scoring (query, class) pairs, boxes mapped back to the original pixels.

  logits [Q, K]; boxes [Q, 4] normalized cxcywh on the square canvas of side `canvas_size`; scale = canvas pixels
  per original pixel; original_size = (height, width). A query may give several classes (DETR's top-k), each with
  that query's attributes. With `nms_iou_threshold`, a pair is dropped when a higher-scoring pair of the same class
  overlaps it by more than that IoU: a set predictor early in training still answers one cell with several
  queries, and those duplicates are false positives that would also crowd real cells out of the top
  `max_detections`.
  """
  num_queries, num_classes = logits.shape
  scores = _sigmoid(logits.astype(np.float64)).ravel()
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
  probs = _softmax(attribute_logits[query].astype(np.float64))
  return Detections(boxes=xyxy, scores=scores[top], labels=label.astype(np.int64),
                    attributes=probs.argmax(-1), attribute_confidence=probs.max(-1))
