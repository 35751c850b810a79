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


def to_detections(logits, boxes, attribute_logits, canvas_size, scale, original_size, max_detections=100,
                  score_threshold=0.0) -> Detections:
  """One image's detections: the top-scoring (query, class) pairs, boxes mapped back to the original pixels.

  logits [Q, K]; boxes [Q, 4] normalized cxcywh on the square canvas of side `canvas_size`; scale = canvas pixels
  per original pixel; original_size = (height, width). A query may give several classes (DETR's top-k), each with
  that query's attributes.
  """
  num_queries, num_classes = logits.shape
  scores = _sigmoid(logits.astype(np.float64)).ravel()
  k = min(max_detections, scores.size)
  top = np.argpartition(-scores, k - 1)[:k]
  top = top[np.argsort(-scores[top], kind='stable')]
  top = top[scores[top] > score_threshold]
  query, label = np.divmod(top, num_classes)
  cx, cy, w, h = np.moveaxis(boxes[query].astype(np.float64), -1, 0)
  xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * canvas_size / scale
  height, width = original_size
  xyxy = np.clip(xyxy, 0, [width, height, width, height])
  probs = _softmax(attribute_logits[query].astype(np.float64))
  return Detections(boxes=xyxy, scores=scores[top], labels=label.astype(np.int64),
                    attributes=probs.argmax(-1), attribute_confidence=probs.max(-1))
