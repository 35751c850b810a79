"""Tests for lld_jax.metrics and lld_jax.plots (hand-made cases, checked against pycocotools)."""

import contextlib
import dataclasses
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lld_jax import metrics as M
from lld_jax import plots

CLASSES = ('a', 'b', 'c')
ATTRS = ('size', 'chrom')
ATTR_VALUES = (('small', 'medium', 'large'), ('open', 'coarse'))


def truth(image_id, boxes, labels, attrs=None, domain='D', mask=None, size=200):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if attrs is None:
    attrs = np.zeros((len(boxes), len(ATTRS)), np.int64)
  return M.ImageTruth(image_id, domain, size, size, boxes, np.asarray(labels, np.int64),
                      np.asarray(attrs, np.int64).reshape(-1, len(ATTRS)), mask)


def pred(image_id, boxes, scores, labels, attrs=None):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if attrs is None:
    attrs = np.zeros((len(boxes), len(ATTRS)), np.int64)
  return M.ImagePrediction(image_id, boxes, np.asarray(scores, np.float64), np.asarray(labels, np.int64),
                           np.asarray(attrs, np.int64).reshape(-1, len(ATTRS)))


def run(truths, preds, **kw):
  return M.evaluate(truths, preds, CLASSES, ATTRS, attribute_values=ATTR_VALUES, **kw)


def test_perfect_predictions():
  t = [truth('1', [[10, 10, 50, 60], [100, 100, 140, 170]], [0, 1]), truth('2', [[0, 0, 30, 30]], [2])]
  p = [pred('1', t[0].boxes, [0.9, 0.8], [0, 1]), pred('2', t[1].boxes, [0.7], [2])]
  m = run(t, p)
  assert m['mAP50'] == pytest.approx(1.0)
  assert m['mAP50_95'] == pytest.approx(1.0)
  for c in CLASSES:
    assert m[f'per_class/{c}/AP50'] == pytest.approx(1.0)
  assert m['num_images'] == 2 and m['num_truths'] == 3 and m['num_predictions'] == 3
  assert m['num_predictions_outside_mask'] == 0


def test_shifted_box_keeps_ap50_lowers_ap75():
  t = [truth('1', [[0, 0, 100, 100]], [0])]
  p = [pred('1', [[20, 0, 120, 100]], [0.9], [0])]  # IoU 80/120 = 0.667: matched at 0.5..0.65 (4 of 10)
  res = M.evaluate_full(t, p, CLASSES, ATTRS, attribute_values=ATTR_VALUES)
  assert res.metrics['mAP50'] == pytest.approx(1.0)
  assert res.metrics['mAP50_95'] == pytest.approx(0.4)
  t75 = int(np.argmin(np.abs(res.iou_thresholds - 0.75)))
  assert res.precision[t75, :, 0].mean() == pytest.approx(0.0)
  # Classes without ground truth are left out of the keys and out of the mean.
  assert 'per_class/b/AP50' not in res.metrics and 'per_class/c/AP50_95' not in res.metrics


def test_higher_scored_false_positive_lowers_ap():
  t = [truth('1', [[0, 0, 40, 40]], [0])]
  tp, fp = [0, 0, 40, 40], [100, 100, 140, 140]
  low = run(t, [pred('1', [tp, fp], [0.9, 0.5], [0, 0])])
  high = run(t, [pred('1', [fp, tp], [0.9, 0.5], [0, 0])])
  assert low['mAP50'] == pytest.approx(1.0)
  assert high['mAP50'] == pytest.approx(0.5)


def test_per_class_values_by_hand():
  # Class a: 2 GT; detections TP 0.9, FP 0.8, TP 0.7 -> PR (.5, 1), (.5, .5), (1, 2/3).
  # Interpolated precision is 1 on the 51 recall thresholds <= .5 and 2/3 on the 50 above: AP = (51 + 50 * 2/3) / 101.
  # Class b: 1 GT, never detected -> AP 0. Class c: no GT (one FP) -> left out.
  t = [truth('1', [[0, 0, 40, 40], [100, 0, 140, 40]], [0, 1]), truth('2', [[0, 0, 40, 40]], [0])]
  p = [pred('1', [[0, 0, 40, 40], [50, 50, 90, 90], [150, 150, 190, 190]], [0.9, 0.8, 0.95], [0, 0, 2]),
       pred('2', [[0, 0, 40, 40]], [0.7], [0])]
  m = run(t, p)
  ap_a = (51 + 50 * 2 / 3) / 101
  assert m['per_class/a/AP50'] == pytest.approx(ap_a)
  assert m['per_class/a/AP50_95'] == pytest.approx(ap_a)
  assert m['per_class/b/AP50'] == pytest.approx(0.0)
  assert 'per_class/c/AP50' not in m
  assert m['mAP50'] == pytest.approx(ap_a / 2)


def test_matches_pycocotools_directly():
  rng = np.random.default_rng(0)
  truths, preds = [], []
  gt_json = {'images': [], 'categories': [{'id': k + 1} for k in range(3)], 'annotations': []}
  dt_json = []
  for i in range(6):
    n = int(rng.integers(0, 8))
    xy = rng.uniform(0, 150, (n, 2))
    wh = rng.uniform(10, 50, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    labels = rng.integers(0, 3, n)
    keep = rng.random(n) < 0.8
    dboxes = boxes[keep] + rng.normal(0, 4, (int(keep.sum()), 4))
    extra = rng.uniform(0, 150, (3, 2))
    dboxes = np.concatenate([dboxes, np.concatenate([extra, extra + 30], 1)])
    dlabels = np.concatenate([np.where(rng.random(int(keep.sum())) < 0.85, labels[keep], (labels[keep] + 1) % 3),
                              rng.integers(0, 3, 3)])
    scores = rng.random(len(dboxes))
    truths.append(truth(f'im{i}', boxes, labels, domain='XY'[i % 2]))
    preds.append(pred(f'im{i}', dboxes, scores, dlabels))
    gt_json['images'].append({'id': i + 1})
    for b, l in zip(boxes, labels):
      gt_json['annotations'].append({'id': len(gt_json['annotations']) + 1, 'image_id': i + 1,
                                     'category_id': int(l) + 1, 'iscrowd': 0, 'area': float((b[2] - b[0]) * (b[3] - b[1])),
                                     'bbox': [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    for b, s, l in zip(dboxes, scores, dlabels):
      dt_json.append({'image_id': i + 1, 'category_id': int(l) + 1, 'score': float(s),
                      'bbox': [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
  # COCOeval.summarize() reads stats[0] at maxDets=100 whatever params.maxDets is: compare with COCO's defaults, and
  # AP50 (read at params.maxDets[2]) with ours.
  for max_dets in ([1, 10, 100], [1, 10, 300]):
    with contextlib.redirect_stdout(io.StringIO()):
      gt = COCO()
      gt.dataset = gt_json
      gt.createIndex()
      ev = COCOeval(gt, gt.loadRes(dt_json), 'bbox')
      ev.params.maxDets = max_dets
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    m = run(truths, preds, max_dets=max_dets)
    if max_dets[2] == 100:
      assert m['mAP50_95'] == pytest.approx(ev.stats[0])
    assert m['mAP50'] == pytest.approx(ev.stats[1])
    assert m['mAP50'] > 0.3
  # Per-domain values (accumulated from the shared per-image results) equal a separate run on the domain's images.
  for d in 'XY':
    sub = run([x for x in truths if x.domain == d], [q for q, x in zip(preds, truths) if x.domain == d])
    assert m[f'domains/{d}/mAP50'] == pytest.approx(sub['mAP50'])
    assert m[f'domains/{d}/mAP50_95'] == pytest.approx(sub['mAP50_95'])
    assert m[f'domains/{d}/mAP50'] != pytest.approx(m['mAP50'])


def _random_case(rng, num_images):
  truths, preds = [], []
  for i in range(num_images):
    n = int(rng.integers(0, 6))
    xy = rng.uniform(0, 150, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 50, (n, 2))], 1)
    labels = rng.integers(0, 3, n)
    found = boxes + rng.normal(0, 5, boxes.shape)
    named = np.where(rng.random(n) < 0.7, labels, (labels + 1) % 3)
    spurious = rng.uniform(0, 150, (2, 2))
    dboxes = np.concatenate([found, np.concatenate([spurious, spurious + 30], 1)])
    truths.append(truth(f'im{i}', boxes, labels))
    preds.append(pred(f'im{i}', dboxes, rng.random(len(dboxes)), np.concatenate([named, rng.integers(0, 3, 2)])))
  return truths, preds


def test_resampled_ap50_equals_evaluating_the_resampled_images():
  rng = np.random.default_rng(3)
  truths, preds = _random_case(rng, 8)
  rows = np.stack([np.arange(8), rng.integers(0, 8, 8), rng.integers(0, 3, 8), np.array([2, 2, 2, 5, 5, 0, 1, 7])])
  found = M.resampled_ap50(truths, preds, CLASSES, ATTRS, rows)
  for s, row in enumerate(rows):
    # The reference: a new dataset in which each listed image is a distinct copy.
    copies = [(dataclasses.replace(truths[i], image_id=f'{k}'), dataclasses.replace(preds[i], image_id=f'{k}'))
              for k, i in enumerate(row)]
    expected = run([t for t, _ in copies], [p for _, p in copies])
    assert found['mAP50'][s] == pytest.approx(expected['mAP50'], nan_ok=True)
    assert found['cells/AP50'][s] == pytest.approx(expected['cells/AP50'])
  assert found['mAP50'][0] == pytest.approx(run(truths, preds)['mAP50'])
  assert len(set(np.round(found['mAP50'], 6))) > 1  # the resamples differ
  with pytest.raises(ValueError, match='positions'):
    M.resampled_ap50(truths, preds, CLASSES, ATTRS, [[0, 8]])


def test_mask_rule():
  mask = np.zeros((100, 100), bool)
  mask[:, :50] = True  # left half annotated
  gt = [[5, 5, 35, 35]]
  tp = [5, 5, 35, 35]
  outside = [60, 60, 90, 90]  # centre (75, 75): outside the mask
  off_image = [-60, -60, -10, -10]  # centre outside the image
  inside = [10, 50, 40, 80]  # centre (25, 65): inside the mask
  boxes, scores = [outside, off_image, tp], [0.9, 0.95, 0.5]
  m = run([truth('1', gt, [0], mask=mask, size=100)], [pred('1', boxes, scores, [0, 0, 0])])
  assert m['mAP50'] == pytest.approx(1.0)
  assert m['num_predictions_outside_mask'] == 2 and m['num_predictions'] == 3
  m = run([truth('1', gt, [0], mask=mask, size=100)], [pred('1', [inside, tp], [0.9, 0.5], [0, 0])])
  assert m['mAP50'] == pytest.approx(0.5)
  assert m['num_predictions_outside_mask'] == 0
  # Without a mask the same false positive counts.
  m = run([truth('1', gt, [0], size=100)], [pred('1', [outside, tp], [0.9, 0.5], [0, 0])])
  assert m['mAP50'] == pytest.approx(0.5)
  # Ground truth outside the mask is kept (a miss here).
  m = run([truth('1', gt + [outside], [0, 0], mask=mask, size=100)], [pred('1', [tp], [0.5], [0])])
  assert m['num_truths'] == 2
  assert m['mAP50'] == pytest.approx(51 / 101)


def test_per_domain_keys():
  t = [truth('1', [[0, 0, 40, 40]], [0], domain='H_100x_C1'),
       truth('2', [[0, 0, 40, 40]], [1], domain='L_10x_C2'),
       truth('3', [], [], domain='H_40x_C1')]
  p = [pred('1', [[0, 0, 40, 40]], [0.9], [0]), pred('2', [[100, 100, 140, 140]], [0.9], [1]),
       pred('3', [[0, 0, 40, 40]], [0.9], [1])]
  m = run(t, p)
  assert m['domains/H_100x_C1/mAP50'] == pytest.approx(1.0)
  assert m['domains/H_100x_C1/mAP50_95'] == pytest.approx(1.0)
  assert m['domains/L_10x_C2/mAP50'] == pytest.approx(0.0)
  assert 'domains/H_40x_C1/mAP50' not in m  # no ground truth in that domain
  assert m['num_images'] == 3


def _attribute_case():
  # Attributes: (size, chrom). Image 1 has 4 cells, image 2 one cell and no detection.
  t = [truth('1', [[0, 0, 20, 20], [50, 50, 70, 70], [100, 100, 120, 120], [0, 100, 20, 120]], [0, 0, 0, 0],
             attrs=[[0, 1], [2, 0], [1, 1], [2, -1]]),
       truth('2', [[0, 0, 20, 20]], [0], attrs=[[-1, 1]])]
  # d1 exact on g1 (other class: matching is class-agnostic), d2 on g2 at IoU 0.39, d4 exact on g4.
  p = [pred('1', [[0, 0, 20, 20], [55, 55, 75, 75], [0, 100, 20, 120]], [0.9, 0.8, 0.7], [1, 0, 0],
            attrs=[[0, 1], [1, 1], [2, 0]])]
  return t, p


def test_attributes_strict_and_paper():
  t, p = _attribute_case()
  res = M.evaluate_full(t, p, CLASSES, ATTRS, attribute_values=ATTR_VALUES)
  m = res.metrics
  # chrom, strict: g1 1->1 TP; g2 0->miss (wrong, not FP); g3 1->miss FN; g4 skipped (-1); g5 1->miss FN.
  s = 'attributes/strict/chrom/'
  assert m[s + 'num_cells'] == 4
  assert m[s + 'accuracy'] == pytest.approx(1 / 4)
  assert m[s + 'precision'] == pytest.approx(1.0)
  assert m[s + 'recall'] == pytest.approx(1 / 3)
  assert m[s + 'f1'] == pytest.approx(0.5)
  # chrom, paper: image 2 dropped; g1->d1 (1) TP; g2->d2 (1) FP; g3->d1 (all IoU 0, highest score) TP.
  s = 'attributes/paper/chrom/'
  assert m[s + 'num_cells'] == 3
  assert m[s + 'accuracy'] == pytest.approx(2 / 3)
  assert m[s + 'precision'] == pytest.approx(2 / 3)
  assert m[s + 'recall'] == pytest.approx(1.0)
  assert m[s + 'f1'] == pytest.approx(0.8)
  # size (3 values, macro): strict g1 0->0, g2 2->miss, g3 1->miss, g4 2->2.
  s = 'attributes/strict/size/'
  assert m[s + 'accuracy'] == pytest.approx(0.5)
  assert m[s + 'precision'] == pytest.approx(2 / 3)
  assert m[s + 'recall'] == pytest.approx(0.5)
  assert m[s + 'f1'] == pytest.approx(5 / 9)
  # paper g1 0->0, g2 2->1, g3 1->0, g4 2->2.
  s = 'attributes/paper/size/'
  assert m[s + 'accuracy'] == pytest.approx(0.5)
  assert m[s + 'precision'] == pytest.approx(0.5)
  assert m[s + 'recall'] == pytest.approx(0.5)
  assert m[s + 'f1'] == pytest.approx(4 / 9)
  # Default scored attributes: the binary ones only (chrom).
  assert m['attributes/mean_f1_strict'] == pytest.approx(0.5)
  assert m['attributes/mean_f1_paper'] == pytest.approx(0.8)
  assert m['attributes/paper/num_images_dropped'] == 1
  assert m['attributes/paper/num_truths_dropped'] == 1
  m2 = run(t, p, scored_attributes=[0, 1])
  assert m2['attributes/mean_f1_strict'] == pytest.approx((0.5 + 5 / 9) / 2)
  # Confusions: rows truth, columns predicted + miss.
  np.testing.assert_array_equal(res.confusions[('strict', 'chrom')].matrix, [[0, 0, 1], [0, 1, 2]])
  np.testing.assert_array_equal(res.confusions[('paper', 'chrom')].matrix, [[0, 1, 0], [0, 2, 0]])
  np.testing.assert_array_equal(res.confusions[('paper', 'size')].matrix, [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
  conf = M.attribute_confusions(t, p, ATTRS, num_classes=len(CLASSES), attribute_values=ATTR_VALUES)
  np.testing.assert_array_equal(conf[('strict', 'size')].matrix, res.confusions[('strict', 'size')].matrix)


def test_lld_defaults_score_attributes_1_to_6():
  from tfds_lld import lld_format
  a = len(lld_format.ATTRIBUTE_NAMES)
  attrs = np.array([[1, 1, 0, 1, 0, 1, 0]])
  t = [M.ImageTruth('1', 'H_100x_C1', 640, 640, np.array([[0., 0, 50, 80]]), np.array([3]), attrs, None)]
  p = [M.ImagePrediction('1', np.array([[0., 0, 50, 80]]), np.array([0.9]), np.array([3]),
                         np.array([[0, 1, 0, 1, 0, 1, 0]]))]  # size wrong, all binary right
  m = M.evaluate(t, p, lld_format.CLASS_NAMES, lld_format.ATTRIBUTE_NAMES)
  assert m['attributes/strict/cell_size/accuracy'] == 0
  assert m['attributes/mean_f1_strict'] == pytest.approx((1 + 0 + 1 + 0 + 1 + 0) / 6)  # positives only where 1
  assert attrs.shape == (1, a)


def test_match_strict_score_order_and_threshold():
  gt = np.array([[0., 0, 10, 10]])
  dets = np.array([[0., 0, 10, 6], [0., 0, 10, 10]])  # IoU 0.6 (higher score), then IoU 1
  np.testing.assert_array_equal(M.match_strict(gt, dets), [0])
  np.testing.assert_array_equal(M.match_strict(gt, np.array([[0., 0, 10, 4]])), [-1])  # IoU 0.4
  np.testing.assert_array_equal(M.match_paper(gt, dets), [1])


def test_empty_inputs():
  t = [truth('1', [], []), truth('2', [[0, 0, 10, 10]], [0])]
  m = run(t, [])
  assert m['mAP50'] == pytest.approx(0.0)
  assert m['num_predictions'] == 0
  m = run([truth('1', [], [])], [])
  assert math.isnan(m['mAP50']) and math.isnan(m['attributes/mean_f1_strict'])
  with pytest.raises(ValueError):
    run(t, [pred('nope', [[0, 0, 1, 1]], [0.5], [0])])


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_plots_write_png(tmp_path):
  t, p = _attribute_case()
  t[1].domain = 'E'
  res = M.evaluate_full(t, p, CLASSES, ATTRS, attribute_values=ATTR_VALUES)
  paths = plots.write_evaluation_plots(res, tmp_path / 'eval')
  paths['pr_from_array'] = plots.plot_pr_curves(res.precision, CLASSES, tmp_path / 'pr2.png')
  paths['training'] = plots.plot_training_curves(
      {'train/loss': [(0, 2.0), (10, 1.5), (20, 1.0)], 'eval/mAP50': [(10, 0.1), (20, 0.3)], 'empty': []},
      tmp_path / 'train.png')
  paths['domains'] = plots.plot_domain_bars(res.metrics, tmp_path / 'dom.png')
  for path in paths.values():
    assert _is_png(path)
    assert (tmp_path / path).stat().st_size > 1000


def test_attribute_threshold_reads_cell_scores_when_given():
  """A detection whose class is uncertain (low score) but whose cell is certain still carries its attributes."""
  t = [truth('0', [[10, 10, 50, 50]], [0], attrs=[[1, 1]])]
  low = pred('0', [[10, 10, 50, 50]], [0.2], [0], attrs=[[1, 1]])
  assert run(t, [low], attribute_score_threshold=0.3)['attributes/strict/chrom/recall'] == 0.0
  certain_cell = M.ImagePrediction(low.image_id, low.boxes, low.scores, low.labels, low.attributes,
                                   cell_scores=np.array([0.6]))
  m = run(t, [certain_cell], attribute_score_threshold=0.3)
  assert m['attributes/strict/chrom/recall'] == 1.0
  assert m['mAP50'] == run(t, [low])['mAP50']  # mAP reads the scores only
  with pytest.raises(ValueError, match='inconsistent prediction lengths'):
    run(t, [M.ImagePrediction('0', low.boxes, low.scores, low.labels, low.attributes, cell_scores=np.ones(2))])


def test_cells_ap_ignores_the_class_and_counts_each_box_once():
  t = [truth('1', [[0, 0, 40, 40], [100, 100, 140, 140]], [0, 1])]
  boxes = [[0, 0, 40, 40], [100, 100, 140, 140], [0, 0, 40, 40]]
  # Both cells found, the second named wrongly; the first box is listed again under another class, lower.
  m = run(t, [pred('1', boxes, [0.9, 0.8, 0.85], [0, 2, 1])])
  assert m['mAP50'] == pytest.approx(0.5)  # a: 1; b: its only detection is the duplicate at a's cell
  assert m['cells/AP50'] == pytest.approx(1.0) and m['cells/AP50_95'] == pytest.approx(1.0)
  # A second box on a found cell is a false positive; ranked above the other cell it costs precision.
  near = [3, 0, 43, 40]
  ranked_high = run(t, [pred('1', [boxes[0], near, boxes[1]], [0.9, 0.85, 0.8], [0, 1, 1])])
  ranked_low = run(t, [pred('1', [boxes[0], near, boxes[1]], [0.9, 0.7, 0.8], [0, 1, 1])])
  assert ranked_low['cells/AP50'] == pytest.approx(1.0)
  assert ranked_high['cells/AP50'] == pytest.approx(1.0 / 2 + 2 / 3 / 2, abs=0.01)
  assert math.isnan(run([truth('1', [], [])], [])['cells/AP50'])


def test_cells_ap_ranks_by_the_detection_scores_as_map_does():
  """Cell scores (the attribute threshold's) do not reorder the detections: only the class is ignored."""
  t = [truth('1', [[0, 0, 40, 40]], [0])]
  boxes = np.array([[100, 100, 140, 140], [0, 0, 40, 40]], np.float64)
  false_first = M.ImagePrediction('1', boxes, np.array([0.6, 0.3]), np.array([0, 0]), np.zeros((2, 2), np.int64),
                                  cell_scores=np.array([0.6, 0.9]))
  assert run(t, [false_first])['cells/AP50'] == pytest.approx(0.5) == run(t, [false_first])['mAP50']
  true_first = M.ImagePrediction('1', boxes, np.array([0.3, 0.6]), false_first.labels, false_first.attributes,
                                 cell_scores=np.array([0.9, 0.6]))
  assert run(t, [true_first])['cells/AP50'] == pytest.approx(1.0)
