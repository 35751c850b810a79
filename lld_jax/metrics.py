"""Detection and attribute metrics for LLD (pure numpy + pycocotools; no JAX).

Detection is scored with pycocotools' COCOeval (COCO objects built in memory). Attributes are scored under two
protocols (see `shared/docs/lld.md`, "How the authors evaluate"):

* strict: detections are greedily matched to ground-truth cells the way COCO does at IoU >= 0.5, but class-agnostic
  (by score order, one detection per ground-truth cell, each detection to the unmatched cell it overlaps most). A
  ground-truth cell with no matched detection counts as wrong (a false negative if its value is positive, an error in
  accuracy in any case).
* paper: every ground-truth cell takes the detection with the highest IoU (no threshold, a detection may serve
  several cells); images with no detection are dropped. This flatters the score; it is kept for comparison.

`cells/AP50` and `cells/AP50_95` score mAP's detections and scores as one class ("a cell is here"), whatever class
they name: each predicted box counts once, at its best score, so a query listed under several classes is not a false
positive of itself. Set against mAP, this separates finding the cells from naming them.

Images with an annotation mask are scored only inside it: detections whose box centre lies outside the mask (or
outside the image) are removed before any scoring (detection and attributes). Ground truth is never dropped.

Undefined values: `mAP50`, `mAP50_95`, `cells/AP50`, `cells/AP50_95` and `attributes/mean_f1_*` are always present
and NaN when undefined; the per-class, per-domain and per-attribute keys are *left out* when undefined (a class with
no ground truth, a domain with no ground truth, an attribute with no scorable cell). Precision/recall/F1 with a zero
denominator are 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tfds_lld import lld_format

STRICT = 'strict'
PAPER = 'paper'
PROTOCOLS = (STRICT, PAPER)
DEFAULT_MAX_DETS = (1, 10, 300)
STRICT_IOU = 0.5


@dataclasses.dataclass
class ImageTruth:
  image_id: str
  domain: str
  height: int
  width: int
  boxes: np.ndarray  # [m, 4] xyxy pixels
  labels: np.ndarray  # [m] int class ids 0..K-1
  attributes: np.ndarray  # [m, A] int, -1 = not applicable
  annotation_mask: np.ndarray | None = None  # [H, W] bool; None = fully annotated
  patient: str = ''  # the patient the field was taken from ('' when unknown): its film, for `eval.class_context`


@dataclasses.dataclass
class ImagePrediction:
  image_id: str
  boxes: np.ndarray  # [n, 4] xyxy pixels
  scores: np.ndarray  # [n]
  labels: np.ndarray  # [n] int class ids 0..K-1
  attributes: np.ndarray  # [n, A] int predicted values
  # [n] confidence that a cell is there whatever its class, for the attribute score threshold; None = scores
  cell_scores: np.ndarray | None = None


@dataclasses.dataclass
class AttributeConfusion:
  """Confusion matrix of one attribute under one protocol.

  matrix[i, j] counts scored ground-truth cells of value i predicted as value j; the last column (`miss`) counts
  cells without a matched detection (strict) or with a predicted value outside 0..V-1.
  """
  attribute: str
  protocol: str
  value_names: tuple[str, ...]
  matrix: np.ndarray  # [V, V + 1] int

  @property
  def column_names(self) -> tuple[str, ...]:
    return self.value_names + ('miss',)


@dataclasses.dataclass
class EvaluationResult:
  metrics: dict[str, float]
  class_names: tuple[str, ...]
  # COCO precision at area 'all' and the largest maxDets, [T, R, K]; -1 where a class has no ground truth.
  precision: np.ndarray
  iou_thresholds: np.ndarray  # [T]
  recall_thresholds: np.ndarray  # [R]
  # Keyed by (protocol, attribute name), protocols 'strict' and 'paper', every attribute (scored or not).
  confusions: dict[tuple[str, str], AttributeConfusion]
  predictions: tuple[ImagePrediction, ...] = ()  # what was scored, as given


# ----------------------------------------------------------------------------------------------------------------
# Input handling.


def _as_boxes(x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.size == 0:
    return np.zeros((0, 4), np.float64)
  if x.ndim != 2 or x.shape[1] != 4:
    raise ValueError(f'boxes must be [n, 4], got shape {x.shape}')
  return x


def _as_attrs(x, n: int, num_attributes: int) -> np.ndarray:
  x = np.asarray(x, dtype=np.int64)
  if x.size == 0 and n == 0:
    return np.zeros((0, num_attributes), np.int64)
  if x.shape != (n, num_attributes):
    raise ValueError(f'attributes must be [{n}, {num_attributes}], got shape {x.shape}')
  return x


@dataclasses.dataclass
class _Image:
  truth: ImageTruth
  gt_boxes: np.ndarray
  gt_labels: np.ndarray
  gt_attrs: np.ndarray
  dt_boxes: np.ndarray  # after the mask rule, sorted by descending score
  dt_scores: np.ndarray
  dt_labels: np.ndarray
  dt_attrs: np.ndarray
  dt_cell_scores: np.ndarray
  num_outside: int


def _inside_mask(boxes: np.ndarray, truth: ImageTruth) -> np.ndarray:
  """Whether each box centre lies inside the image and the annotation mask."""
  mask = np.asarray(truth.annotation_mask, dtype=bool)
  if mask.shape != (truth.height, truth.width):
    raise ValueError(f'{truth.image_id}: annotation_mask shape {mask.shape} != {(truth.height, truth.width)}')
  cx = (boxes[:, 0] + boxes[:, 2]) / 2
  cy = (boxes[:, 1] + boxes[:, 3]) / 2
  inside = (cx >= 0) & (cx < truth.width) & (cy >= 0) & (cy < truth.height)
  keep = np.zeros(len(boxes), bool)
  ix = np.floor(cx[inside]).astype(np.int64)
  iy = np.floor(cy[inside]).astype(np.int64)
  keep[inside] = mask[iy, ix]
  return keep


def _prepare(truths, predictions, num_classes: int, num_attributes: int) -> list[_Image]:
  by_id: dict[str, ImagePrediction] = {}
  for p in predictions:
    if p.image_id in by_id:
      raise ValueError(f'duplicate predictions for image {p.image_id!r}')
    by_id[p.image_id] = p
  truth_ids = [t.image_id for t in truths]
  if len(set(truth_ids)) != len(truth_ids):
    raise ValueError('duplicate image ids in truths')
  unknown = set(by_id) - set(truth_ids)
  if unknown:
    raise ValueError(f'predictions for images without truth: {sorted(unknown)[:5]}')

  images = []
  for t in truths:
    gt_boxes = _as_boxes(t.boxes)
    gt_labels = np.asarray(t.labels, np.int64).reshape(-1)
    if len(gt_labels) != len(gt_boxes):
      raise ValueError(f'{t.image_id}: {len(gt_boxes)} boxes but {len(gt_labels)} labels')
    gt_attrs = _as_attrs(t.attributes, len(gt_boxes), num_attributes)
    p = by_id.get(t.image_id)
    if p is None:
      dt_boxes = np.zeros((0, 4))
      dt_scores = np.zeros((0,))
      dt_labels = np.zeros((0,), np.int64)
      dt_attrs = np.zeros((0, num_attributes), np.int64)
      dt_cell_scores = dt_scores
    else:
      dt_boxes = _as_boxes(p.boxes)
      dt_scores = np.asarray(p.scores, np.float64).reshape(-1)
      dt_labels = np.asarray(p.labels, np.int64).reshape(-1)
      dt_cell_scores = dt_scores if p.cell_scores is None else np.asarray(p.cell_scores, np.float64).reshape(-1)
      if not len(dt_boxes) == len(dt_scores) == len(dt_labels) == len(dt_cell_scores):
        raise ValueError(f'{t.image_id}: inconsistent prediction lengths')
      dt_attrs = _as_attrs(p.attributes, len(dt_boxes), num_attributes)
    for name, labels in (('truth', gt_labels), ('prediction', dt_labels)):
      if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'{t.image_id}: {name} label outside 0..{num_classes - 1}')
    num_outside = 0
    if t.annotation_mask is not None and len(dt_boxes):
      keep = _inside_mask(dt_boxes, t)
      num_outside = int((~keep).sum())
      dt_boxes, dt_scores, dt_labels, dt_attrs, dt_cell_scores = (
          x[keep] for x in (dt_boxes, dt_scores, dt_labels, dt_attrs, dt_cell_scores))
    order = np.argsort(-dt_scores, kind='stable')
    images.append(_Image(t, gt_boxes, gt_labels, gt_attrs, dt_boxes[order], dt_scores[order], dt_labels[order],
                         dt_attrs[order], dt_cell_scores[order], num_outside))
  return images


# ----------------------------------------------------------------------------------------------------------------
# Detection (COCOeval).


def _xywh(b: np.ndarray) -> list[float]:
  return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]


def _make_coco(dataset: dict) -> COCO:
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _build_cocos(images: list[_Image], num_classes: int) -> tuple[COCO, COCO]:
  image_entries = [{'id': i + 1, 'height': int(im.truth.height), 'width': int(im.truth.width),
                    'file_name': str(im.truth.image_id)} for i, im in enumerate(images)]
  categories = [{'id': k + 1, 'name': str(k)} for k in range(num_classes)]
  gt_anns, dt_anns = [], []
  for i, im in enumerate(images):
    for b, l in zip(im.gt_boxes, im.gt_labels):
      box = _xywh(b)
      gt_anns.append({'id': len(gt_anns) + 1, 'image_id': i + 1, 'category_id': int(l) + 1, 'bbox': box,
                      'area': box[2] * box[3], 'iscrowd': 0})
    for b, s, l in zip(im.dt_boxes, im.dt_scores, im.dt_labels):
      box = _xywh(b)
      dt_anns.append({'id': len(dt_anns) + 1, 'image_id': i + 1, 'category_id': int(l) + 1, 'bbox': box,
                      'area': box[2] * box[3], 'score': float(s), 'iscrowd': 0})
  gt = _make_coco({'images': image_entries, 'categories': categories, 'annotations': gt_anns})
  dt = _make_coco({'images': image_entries, 'categories': categories, 'annotations': dt_anns})
  return gt, dt


def _class_agnostic(images: list[_Image]) -> list[_Image]:
  """The images with every label 0 and each distinct predicted box once, at its best score (they are sorted by
  score, so its first listing)."""
  agnostic = []
  for im in images:
    _, first = np.unique(im.dt_boxes, axis=0, return_index=True)
    keep = np.sort(first)
    agnostic.append(dataclasses.replace(
        im, gt_labels=np.zeros_like(im.gt_labels), dt_boxes=im.dt_boxes[keep], dt_scores=im.dt_scores[keep],
        dt_labels=np.zeros_like(im.dt_labels[keep]), dt_attrs=im.dt_attrs[keep],
        dt_cell_scores=im.dt_cell_scores[keep]))
  return agnostic


def _run_cocoeval(gt: COCO, dt: COCO, img_ids: list[int], max_dets: Sequence[int]) -> COCOeval:
  ev = COCOeval(gt, dt, iouType='bbox')
  ev.params.imgIds = list(img_ids)
  ev.params.maxDets = list(max_dets)
  with contextlib.redirect_stdout(io.StringIO()):
    ev.evaluate()
    ev.accumulate()
  return ev


def _detection_evals(images: list[_Image], num_classes: int, max_dets: Sequence[int]) -> tuple[COCOeval, COCOeval]:
  """COCOeval of every image, by class (mAP) and as one class (cells AP)."""
  all_ids = list(range(1, len(images) + 1))
  by_class = _run_cocoeval(*_build_cocos(images, num_classes), all_ids, max_dets)
  cells = _run_cocoeval(*_build_cocos(_class_agnostic(images), 1), all_ids, max_dets)
  return by_class, cells


def _accumulate_images(ev: COCOeval, positions: Sequence[int]) -> np.ndarray:
  """[T, R, K] precision over the evaluated images at `positions` (0-based, in ev's image order; an image listed
  twice counts twice), reusing ev's per-image results instead of matching again.

  pycocotools' accumulate reads evalImgs as [category][area range][image] over `_paramsEval.imgIds`, so the
  per-image entries are laid out again for the listed images, and everything is restored afterwards. Only the
  area range 'all' (the first) and the largest maxDets are accumulated: the others are never read here.
  """
  params, params_eval = ev.params, ev._paramsEval
  num_images = len(params_eval.imgIds)
  num_blocks = len(ev.evalImgs) // num_images  # categories x area ranges
  positions = [int(i) for i in positions]
  saved = ev.evalImgs, ev.eval, params_eval.imgIds, params.imgIds, params.areaRng, params.maxDets
  ev.evalImgs = [saved[0][block * num_images + i] for block in range(num_blocks) for i in positions]
  params_eval.imgIds = params.imgIds = list(range(1, len(positions) + 1))
  params.areaRng, params.maxDets = params.areaRng[:1], params.maxDets[-1:]
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      ev.accumulate()
    return _coco_precision(ev)
  finally:
    ev.evalImgs, ev.eval, params_eval.imgIds, params.imgIds, params.areaRng, params.maxDets = saved


def _coco_precision(ev: COCOeval) -> np.ndarray:
  """[T, R, K] precision at area 'all' and the largest maxDets."""
  return ev.eval['precision'][:, :, :, 0, -1]


def _mean_valid(x: np.ndarray) -> float:
  valid = x[x > -1]
  return float(valid.mean()) if valid.size else float('nan')


def _ap_metrics(precision: np.ndarray, iou_thresholds: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
  """(mAP50, mAP50_95, AP50 per class, AP50_95 per class); classes without ground truth get NaN."""
  t50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
  num_classes = precision.shape[2]
  ap50 = np.array([_mean_valid(precision[t50, :, k]) for k in range(num_classes)])
  ap = np.array([_mean_valid(precision[:, :, k]) for k in range(num_classes)])
  return _mean_valid(precision[t50]), _mean_valid(precision), ap50, ap


# ----------------------------------------------------------------------------------------------------------------
# Attributes.


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU matrix [len(a), len(b)] of xyxy boxes (same formula as pycocotools, no +1)."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
  area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a[:, None] + area_b[None, :] - inter
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(union > 0, inter / union, 0.0)


def match_strict(gt_boxes: np.ndarray, dt_boxes: np.ndarray, iou_threshold: float = STRICT_IOU) -> np.ndarray:
  """COCO-style greedy class-agnostic matching. dt_boxes must be sorted by descending score.

  Returns, per ground-truth box, the index of its matched detection or -1.
  """
  gt_match = np.full(len(gt_boxes), -1, np.int64)
  if len(gt_boxes) == 0 or len(dt_boxes) == 0:
    return gt_match
  ious = box_iou(dt_boxes, gt_boxes)
  thr = min(iou_threshold, 1 - 1e-10)
  for d in range(len(dt_boxes)):
    cand = np.where(gt_match < 0, ious[d], -1.0)
    g = int(np.argmax(cand))
    if cand[g] >= thr:
      gt_match[g] = d
  return gt_match


def match_paper(gt_boxes: np.ndarray, dt_boxes: np.ndarray) -> np.ndarray:
  """Per ground-truth box, the detection with the highest IoU (no threshold; ties to the earlier, i.e. higher-score,
  detection). -1 for every box when there is no detection."""
  if len(dt_boxes) == 0:
    return np.full(len(gt_boxes), -1, np.int64)
  if len(gt_boxes) == 0:
    return np.zeros((0,), np.int64)
  return np.argmax(box_iou(gt_boxes, dt_boxes), axis=1).astype(np.int64)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
  p = tp / (tp + fp) if tp + fp else 0.0
  r = tp / (tp + fn) if tp + fn else 0.0
  f = 2 * p * r / (p + r) if p + r else 0.0
  return p, r, f


def scores_from_confusion(matrix: np.ndarray) -> dict[str, float] | None:
  """accuracy, precision, recall, f1 (and num_cells) from a [V, V + 1] confusion matrix; None if it is empty.

  Binary attributes (V == 2): positive class = value 1. V > 2: macro average over the values that occur in the
  ground truth or the (valid) predictions; F1 is the mean of the per-value F1s.
  """
  matrix = np.asarray(matrix, np.int64)
  v = matrix.shape[0]
  total = int(matrix.sum())
  if total == 0:
    return None
  correct = int(np.trace(matrix[:, :v]))

  def one(k):
    tp = int(matrix[k, k])
    return _prf(tp, int(matrix[:, k].sum()) - tp, int(matrix[k].sum()) - tp)

  if v == 2:
    p, r, f = one(1)
  else:
    present = [k for k in range(v) if matrix[k].sum() or matrix[:, k].sum()]
    p, r, f = (float(np.mean(x)) for x in zip(*[one(k) for k in present]))
  return {'accuracy': correct / total, 'precision': p, 'recall': r, 'f1': f, 'num_cells': float(total)}


def _attribute_confusions(images: list[_Image], attribute_names, value_names, score_threshold: float):
  confusions = {}
  mats = {proto: [np.zeros((len(vn), len(vn) + 1), np.int64) for vn in value_names] for proto in PROTOCOLS}
  dropped_images = dropped_cells = 0
  for im in images:
    keep = im.dt_cell_scores >= score_threshold
    dt_boxes, dt_attrs = im.dt_boxes[keep], im.dt_attrs[keep]
    matches = {STRICT: match_strict(im.gt_boxes, dt_boxes), PAPER: match_paper(im.gt_boxes, dt_boxes)}
    if len(dt_boxes) == 0 and len(im.gt_boxes):
      dropped_images += 1
      dropped_cells += len(im.gt_boxes)
    for proto in PROTOCOLS:
      if proto == PAPER and len(dt_boxes) == 0:
        continue  # the authors drop images with no detection
      m = matches[proto]
      for a, vn in enumerate(value_names):
        nv = len(vn)
        gt_vals = im.gt_attrs[:, a]
        scored = (gt_vals >= 0) & (gt_vals < nv)
        if not scored.any():
          continue
        pred = np.full(len(gt_vals), nv, np.int64)
        matched = m >= 0
        pred[matched] = dt_attrs[m[matched], a]
        pred[(pred < 0) | (pred >= nv)] = nv
        np.add.at(mats[proto][a], (gt_vals[scored], pred[scored]), 1)
  for proto in PROTOCOLS:
    for a, name in enumerate(attribute_names):
      confusions[(proto, name)] = AttributeConfusion(name, proto, tuple(value_names[a]), mats[proto][a])
  return confusions, dropped_images, dropped_cells


def _resolve_value_names(attribute_names, attribute_values, images) -> list[tuple[str, ...]]:
  if attribute_values is not None:
    if len(attribute_values) != len(attribute_names):
      raise ValueError('attribute_values must have one entry per attribute')
    return [tuple(str(v) for v in vs) for vs in attribute_values]
  lld = dict(zip(lld_format.ATTRIBUTE_NAMES, lld_format.ATTRIBUTE_VALUES))
  out = []
  for a, name in enumerate(attribute_names):
    if name in lld:
      out.append(tuple(lld[name]))
      continue
    vals = [im.gt_attrs[:, a] for im in images]
    top = max([int(v.max()) for v in vals if v.size] + [1])
    out.append(tuple(str(i) for i in range(top + 1)))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Public entry points.


def evaluate_full(truths: Sequence[ImageTruth], predictions: Sequence[ImagePrediction], class_names: Sequence[str],
                  attribute_names: Sequence[str], scored_attributes: Sequence[int] | None = None, *,
                  attribute_values: Sequence[Sequence[str]] | None = None,
                  attribute_score_threshold: float = 0.0,
                  max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> EvaluationResult:
  """Everything `evaluate` computes, plus the arrays the plots need (see the module docstring for the rules).

  attribute_values: value names per attribute (their count defines the number of values); default: LLD's names for
    LLD attribute names, else values 0..max seen in the ground truth (at least 2).
  scored_attributes: attribute indices averaged into `attributes/mean_f1_*`; default: every attribute with 2 values.
  attribute_score_threshold: detections whose cell score (`ImagePrediction.cell_scores`, else their score) is below
    it are ignored by both attribute protocols (not by mAP).
  max_dets: COCOeval maxDets; AP uses the last (largest) one.
  """
  class_names = tuple(class_names)
  attribute_names = tuple(attribute_names)
  images = _prepare(truths, predictions, len(class_names), len(attribute_names))
  metrics: dict[str, float] = {
      'num_images': float(len(images)),
      'num_truths': float(sum(len(im.gt_boxes) for im in images)),
      'num_predictions': float(sum(np.asarray(p.scores).size for p in predictions)),
      'num_predictions_outside_mask': float(sum(im.num_outside for im in images)),
  }

  # Detection.
  ev, cells = _detection_evals(images, len(class_names), max_dets)
  iou_thr = np.asarray(ev.params.iouThrs)
  precision = _coco_precision(ev)
  map50, map50_95, ap50, ap = _ap_metrics(precision, iou_thr)
  metrics['mAP50'] = map50
  metrics['mAP50_95'] = map50_95
  for k, name in enumerate(class_names):
    if not np.isnan(ap50[k]):
      metrics[f'per_class/{name}/AP50'] = float(ap50[k])
      metrics[f'per_class/{name}/AP50_95'] = float(ap[k])
  metrics['cells/AP50'], metrics['cells/AP50_95'], _, _ = _ap_metrics(_coco_precision(cells), iou_thr)

  domains: dict[str, list[int]] = {}
  for i, im in enumerate(images):
    domains.setdefault(str(im.truth.domain), []).append(i + 1)
  for domain in sorted(domains):
    d50, d, _, _ = _ap_metrics(_accumulate_images(ev, [i - 1 for i in domains[domain]]), iou_thr)
    if not np.isnan(d50):
      metrics[f'domains/{domain}/mAP50'] = d50
      metrics[f'domains/{domain}/mAP50_95'] = d

  # Attributes.
  value_names = _resolve_value_names(attribute_names, attribute_values, images)
  if scored_attributes is None:
    scored_attributes = [a for a, vn in enumerate(value_names) if len(vn) == 2]
  confusions, dropped_images, dropped_cells = _attribute_confusions(images, attribute_names, value_names,
                                                                   attribute_score_threshold)
  for proto in PROTOCOLS:
    f1s = []
    for a, name in enumerate(attribute_names):
      s = scores_from_confusion(confusions[(proto, name)].matrix)
      if s is None:
        continue
      for key, value in s.items():
        metrics[f'attributes/{proto}/{name}/{key}'] = float(value)
      if a in scored_attributes:
        f1s.append(s['f1'])
    metrics[f'attributes/mean_f1_{proto}'] = float(np.mean(f1s)) if f1s else float('nan')
  metrics['attributes/paper/num_images_dropped'] = float(dropped_images)
  metrics['attributes/paper/num_truths_dropped'] = float(dropped_cells)

  return EvaluationResult(metrics=metrics, class_names=class_names, precision=precision, iou_thresholds=iou_thr,
                          recall_thresholds=np.asarray(ev.params.recThrs), confusions=confusions,
                          predictions=tuple(predictions))


def resampled_ap50(truths: Sequence[ImageTruth], predictions: Sequence[ImagePrediction], class_names: Sequence[str],
                   attribute_names: Sequence[str], image_indices, *,
                   max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> dict[str, np.ndarray]:
  """`mAP50` and `cells/AP50` [S] of S resamples of the images, as `evaluate` scores them.

  image_indices [S, n]: each row lists positions in `truths` (repeats allowed: a bootstrap resample draws images
  with replacement). Every image is matched once; each row only re-accumulates, so thousands of resamples are cheap.
  Resample all runs with the same rows to compare them paired.
  """
  images = _prepare(truths, predictions, len(class_names), len(attribute_names))
  by_class, cells = _detection_evals(images, len(class_names), max_dets)
  iou_thr = np.asarray(by_class.params.iouThrs)
  rows = np.asarray(image_indices, np.int64)
  if rows.ndim != 2 or (rows.size and (rows.min() < 0 or rows.max() >= len(images))):
    raise ValueError(f'image_indices must be [S, n] positions in 0..{len(images) - 1}, got shape {rows.shape}')
  ap50 = lambda ev, row: _ap_metrics(_accumulate_images(ev, row), iou_thr)[0]
  return {'mAP50': np.array([ap50(by_class, row) for row in rows]),
          'cells/AP50': np.array([ap50(cells, row) for row in rows])}


def evaluate(truths: Sequence[ImageTruth], predictions: Sequence[ImagePrediction], class_names: Sequence[str],
             attribute_names: Sequence[str], scored_attributes: Sequence[int] | None = None,
             **kwargs) -> dict[str, float]:
  """Flat metrics dict (see the module docstring); keyword arguments as `evaluate_full`."""
  return evaluate_full(truths, predictions, class_names, attribute_names, scored_attributes, **kwargs).metrics


def attribute_confusions(truths: Sequence[ImageTruth], predictions: Sequence[ImagePrediction],
                         attribute_names: Sequence[str], *, num_classes: int = lld_format.NUM_CLASSES,
                         attribute_values: Sequence[Sequence[str]] | None = None,
                         attribute_score_threshold: float = 0.0) -> dict[tuple[str, str], AttributeConfusion]:
  """Only the attribute confusion matrices, keyed by (protocol, attribute name) (no COCOeval run)."""
  images = _prepare(truths, predictions, num_classes, len(attribute_names))
  value_names = _resolve_value_names(tuple(attribute_names), attribute_values, images)
  return _attribute_confusions(images, tuple(attribute_names), value_names, attribute_score_threshold)[0]
