"""Known-answer tests of crate_jax.interpretability (maps, segmentation, scores)."""

import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax.interpretability import maps
from crate_jax.interpretability import scores
from crate_jax.interpretability import segmentation

# --------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------

GRID = (4, 5)
PLANTED = [(1, 1), (1, 2), (2, 1), (2, 2)]  # head 0's object.
PLANTED_1 = [(0, 4), (3, 0)]  # head 1's object.


def _planted_attention(layers=2, batch=1):
  """Softmax-like attention `(L, B, K=2, T, T)`: the CLS row puts 0.9 on a planted set."""
  gh, gw = GRID
  t = 1 + gh * gw
  attn = np.full((layers, batch, 2, t, t), 1.0 / t)
  for k, planted in enumerate([PLANTED, PLANTED_1]):
    row = np.zeros(t)
    row[0] = 0.05  # CLS -> CLS.
    others = [1 + i * gw + j for i in range(gh) for j in range(gw) if (i, j) not in planted]
    row[others] = 0.05 / len(others)
    for i, j in planted:
      row[1 + i * gw + j] = 0.9 / len(planted)
    attn[:, :, k, 0] = row
  # A non-CLS query concentrated elsewhere: must not leak into the CLS maps.
  attn[:, :, :, 1] = 0.0
  attn[:, :, :, 1, -1] = 1.0
  return jnp.asarray(attn)


def _grid_mask(cells, grid=GRID):
  m = np.zeros(grid, dtype=bool)
  for c in cells:
    m[c] = True
  return m


def _two_cluster_features(object_mask, rng, dim=8, noise=0.02):
  """Patch features `(N, dim)`: direction e0 on the object, e1 on the background, plus noise."""
  n = object_mask.size
  f = np.zeros((n, dim))
  f[object_mask.reshape(-1), 0] = 1.0
  f[~object_mask.reshape(-1), 1] = 1.0
  return f + noise * rng.normal(size=f.shape)


def _block(grid, rows, cols):
  m = np.zeros(grid, dtype=bool)
  m[rows[0] : rows[1], cols[0] : cols[1]] = True
  return m


# --------------------------------------------------------------------------------------
# maps.
# --------------------------------------------------------------------------------------


def test_cls_attention_maps_find_the_planted_object():
  attn = _planted_attention()
  m = maps.cls_attention_maps(attn, GRID)
  assert m.shape == (2, 1, 2) + GRID
  np.testing.assert_allclose(np.asarray(m[0, 0, 0])[_grid_mask(PLANTED)], 0.9 / 4, rtol=1e-6)
  values = np.asarray(m[1, 0, 0])
  np.testing.assert_array_equal(values >= np.sort(values.reshape(-1))[-4], _grid_mask(PLANTED))
  # One layer works too, and the wrong prefix count is rejected.
  assert maps.cls_attention_maps(attn[0], GRID).shape == (1, 2) + GRID
  with pytest.raises(ValueError):
    maps.cls_attention_maps(attn, GRID, num_prefix_tokens=2)


def test_mass_threshold_keeps_exactly_the_planted_set():
  m = maps.cls_attention_maps(_planted_attention(), GRID)
  # The 4 planted patches hold 0.9 / 0.95 of the map, the others 0.05 / 0.95 together: any
  # mass in (0.71, 0.94] needs all 4 and nothing else (see the docstring rule).
  keep = np.asarray(maps.mass_threshold(m, mass=0.8))
  np.testing.assert_array_equal(keep[:, :, 0], np.broadcast_to(_grid_mask(PLANTED), (2, 1) + GRID))
  np.testing.assert_array_equal(
    keep[:, :, 1], np.broadcast_to(_grid_mask(PLANTED_1), (2, 1) + GRID)
  )
  # 60 % needs only 3 of the 4 equal planted patches (0.05 + 3 * 0.237 > 0.6 / ... ).
  keep60 = np.asarray(maps.mass_threshold(m[0, 0, 0], mass=0.6))
  assert keep60.sum() == 3 and not np.any(keep60 & ~_grid_mask(PLANTED))
  assert not np.any(np.asarray(maps.mass_threshold(jnp.zeros(GRID))))


def test_auroc_of_planted_constant_and_inverted_maps():
  m = np.asarray(maps.cls_attention_maps(_planted_attention(), GRID))[0, 0, 0]
  labels = _grid_mask(PLANTED)
  assert scores.auroc(m, labels) == 1.0
  assert scores.auroc(np.ones(GRID), labels) == 0.5
  assert scores.auroc(-m, labels) == 0.0
  assert np.isnan(scores.auroc(m, np.zeros(GRID, dtype=bool)))
  # Ties between classes count one half: positives {2, 1}, negatives {1, 0} -> 3.5 / 4.
  assert scores.auroc(np.array([2.0, 1.0, 1.0, 0.0]), np.array([1, 1, 0, 0])) == 0.875


def test_key_features_and_patch_tokens():
  rng = np.random.default_rng(0)
  head_proj = jnp.asarray(rng.normal(size=(2, 3, 7, 4, 5)))  # (L, B, T, K, p)
  f = maps.key_features(head_proj)
  assert f.shape == (2, 3, 7, 20)
  np.testing.assert_array_equal(f[1, 2, 3, 2 * 5 + 4], head_proj[1, 2, 3, 2, 4])
  np.testing.assert_array_equal(maps.patch_tokens(f), f[:, :, 1:])
  np.testing.assert_array_equal(maps.patch_tokens(head_proj, axis=-3), head_proj[:, :, 1:])


def test_upsample_nearest_is_exactly_the_patch_block_nonsquare():
  grid, patch = (3, 4), (2, 3)
  onehot = np.zeros(grid, dtype=bool)
  onehot[2, 1] = True
  up = np.asarray(maps.upsample(jnp.asarray(onehot), patch))
  expected = np.zeros((6, 12), dtype=bool)
  expected[4:6, 3:6] = True
  assert up.dtype == bool
  np.testing.assert_array_equal(up, expected)


def test_upsample_bilinear_constant_and_half_pixel_alignment():
  const = np.asarray(maps.upsample(jnp.full((2, 3, 4), 0.7), (4, 2), mode="bilinear"))
  assert const.shape == (2, 12, 8)
  np.testing.assert_allclose(const, 0.7, rtol=1e-6)
  # A ramp m[i] = i: interior pixel y sits at grid coordinate (y + 0.5) / p - 0.5; the outer
  # half patch is clamped to the edge value.
  ramp = jnp.broadcast_to(jnp.arange(4.0)[:, None], (4, 3))
  up = np.asarray(maps.upsample(ramp, 4, mode="bilinear"))[:, 0]
  y = np.arange(16)
  np.testing.assert_allclose(up, np.clip((y + 0.5) / 4 - 0.5, 0, 3), atol=1e-6)
  # Each interior patch's block averages to the patch's own value.
  np.testing.assert_allclose(up.reshape(4, 4).mean(1)[1:3], [1.0, 2.0], atol=1e-6)
  with pytest.raises(ValueError):
    maps.upsample(ramp, 4, mode="cubic")


def test_patch_level_targets():
  pixel = np.zeros((8, 12), dtype=bool)
  pixel[0:3, 0:4] = True  # 3/4 of patch (0, 0).
  pixel[4:5, 4:8] = True  # 1/4 of patch (1, 1).
  fraction, binary = maps.patch_level_targets(pixel, 4)
  expected = np.zeros((2, 3))
  expected[0, 0], expected[1, 1] = 0.75, 0.25
  np.testing.assert_allclose(fraction, expected)
  np.testing.assert_array_equal(binary, expected >= 0.5)
  # Round trip with the nearest upsampling, non-square patches.
  mask = _grid_mask(PLANTED)
  fraction, binary = maps.patch_level_targets(maps.upsample(jnp.asarray(mask), (2, 3)), (2, 3))
  np.testing.assert_array_equal(binary, mask)
  np.testing.assert_array_equal(fraction, mask.astype(float))
  with pytest.raises(ValueError):
    maps.patch_level_targets(pixel, 5)


# --------------------------------------------------------------------------------------
# segmentation.
# --------------------------------------------------------------------------------------

G8 = (8, 8)


def test_pca_foreground_sign_rule_is_solver_independent(monkeypatch):
  rng = np.random.default_rng(1)
  obj = _block(G8, (3, 6), (2, 6))  # touches no border.
  f = _two_cluster_features(obj, rng, noise=0.05)
  mask, s = segmentation.pca_foreground(f, G8)
  np.testing.assert_array_equal(mask, obj)
  assert np.all(s[obj] > 0) and np.all(s[~obj] <= 0)
  # Whatever sign the SVD returns: negated or channel-permuted features give the same mask.
  np.testing.assert_array_equal(segmentation.pca_foreground(-f, G8)[0], obj)
  np.testing.assert_array_equal(segmentation.pca_foreground(f[:, ::-1], G8)[0], obj)
  # A solver returning the opposite sign: same mask, same oriented scores.
  solver = segmentation._principal_components
  monkeypatch.setattr(
    segmentation, "_principal_components", lambda x, n: tuple(-y for y in solver(x, n))
  )
  flipped_mask, flipped_s = segmentation.pca_foreground(f, G8)
  np.testing.assert_array_equal(flipped_mask, obj)
  np.testing.assert_allclose(flipped_s, s)
  monkeypatch.undo()
  # The rule itself, on both signs of the same component.
  flat = s.reshape(-1)
  assert segmentation.orient_foreground(flat, G8) == 1.0
  assert segmentation.orient_foreground(-flat, G8) == -1.0


def test_pca_foreground_object_touching_the_border_and_batch():
  rng = np.random.default_rng(2)
  centre = _block(G8, (3, 6), (2, 6))
  bottom = _block(G8, (5, 8), (2, 6))  # 4 border patches vs the background's 24.
  f = np.stack([_two_cluster_features(m, rng, noise=0.05) for m in (centre, bottom)])
  mask, s = segmentation.pca_foreground(f, G8)
  assert mask.shape == s.shape == (2,) + G8
  np.testing.assert_array_equal(mask[0], centre)
  np.testing.assert_array_equal(mask[1], bottom)


def test_pca_parts_colours_foreground_parts_only():
  rng = np.random.default_rng(3)
  fg = _block(G8, (2, 6), (2, 6))
  part_a = _block(G8, (2, 4), (2, 6))
  f = 0.05 * rng.normal(size=(64, 8))
  f[part_a.reshape(-1), 2] += 1.0
  f[(fg & ~part_a).reshape(-1), 3] += 1.0
  f[~fg.reshape(-1), 0] += 5.0  # background far away: must not affect the colours.
  rgb = segmentation.pca_parts(f, fg)
  assert rgb.shape == G8 + (3,)
  assert np.all(rgb[~fg] == 0) and rgb.min() >= 0 and rgb.max() <= 1
  first = rgb[..., 0]
  # The first component separates the two parts: one at the top of the scale, one at the bottom.
  assert abs(first[part_a].mean() - first[fg & ~part_a].mean()) > 0.8


def test_normalized_cut_separates_two_clusters():
  n_a, n_b = 5, 7
  labels = np.array([True] * n_a + [False] * n_b)
  rng = np.random.default_rng(4)
  perm = rng.permutation(n_a + n_b)
  labels = labels[perm]
  w = np.where(labels[:, None] == labels[None, :], 1.0, 0.01)
  cut = segmentation.normalized_cut(w)
  assert np.array_equal(cut.partition, labels) or np.array_equal(cut.partition, ~labels)
  assert 0 <= cut.eigenvalue < 0.1
  assert segmentation.ncut_value(w, labels) < 0.05
  assert segmentation.ncut_value(w, labels) < segmentation.ncut_value(w, perm < 6)


def test_maskcut_first_mask_is_the_object():
  rng = np.random.default_rng(5)
  obj = _block(G8, (2, 5), (3, 6))
  res = segmentation.maskcut(_two_cluster_features(obj, rng), G8, num_masks=3)
  assert res.masks.shape == (3,) + G8 and res.scores.shape == (3,)
  np.testing.assert_array_equal(res.masks[0], obj)
  assert res.scores[0] > 0.95
  assert res.masks.sum(0).max() <= 1  # disjoint.


def test_maskcut_keeps_the_seed_component_only():
  rng = np.random.default_rng(6)
  left, right = _block(G8, (3, 5), (1, 3)), _block(G8, (3, 5), (5, 7))
  res = segmentation.maskcut(_two_cluster_features(left | right, rng), G8, num_masks=2)
  first = res.masks[0]
  assert np.array_equal(first, left) or np.array_equal(first, right)
  # The other blob is found by the next cut.
  second = res.masks[1]
  assert np.array_equal(first | second, left | right)


def test_maskcut_corner_rule_flips_a_foreground_holding_the_corners():
  rng = np.random.default_rng(7)
  corners = np.zeros(G8, dtype=bool)
  for r, c in [(0, 0), (0, 6), (6, 0), (6, 6)]:
    corners[r : r + 2, c : c + 2] = True
  f = _two_cluster_features(corners, rng)
  # The small corner cluster holds argmax |v|; it holds 4 corners, so the sides are swapped.
  flipped = segmentation.maskcut(f, G8, num_masks=1).masks[0]
  np.testing.assert_array_equal(flipped, ~corners)
  # With the rule disabled the seed side wins, and only the seed's component is kept.
  kept = segmentation.maskcut(f, G8, num_masks=1, flip_corners=5).masks[0]
  assert kept.sum() == 4 and np.all(corners[kept])
  # Two corners: kept at the published threshold (3), flipped at 2.
  top = _block(G8, (0, 2), (0, 2)) | _block(G8, (0, 2), (6, 8))
  f2 = _two_cluster_features(top, rng)
  kept = segmentation.maskcut(f2, G8, num_masks=1).masks[0]
  assert kept.sum() == 4 and np.all(top[kept])
  np.testing.assert_array_equal(
    segmentation.maskcut(f2, G8, num_masks=1, flip_corners=2).masks[0], ~top
  )


# --------------------------------------------------------------------------------------
# scores: IoU, AP50.
# --------------------------------------------------------------------------------------


def test_iou_and_mean_iou_edge_cases():
  a = _block((4, 4), (0, 2), (0, 2))  # 4 pixels
  b = _block((4, 4), (0, 2), (1, 3))  # overlaps a on 2, union 6.
  empty = np.zeros((4, 4), dtype=bool)
  assert scores.iou(a, a) == 1.0
  np.testing.assert_allclose(scores.iou(a, b), 1 / 3)
  assert scores.iou(empty, a) == 0.0
  assert scores.iou(empty, empty) == 1.0  # empty union: perfect agreement by default.
  assert np.isnan(scores.iou(empty, empty, empty=np.nan))
  pred, target = np.stack([a, empty, a]), np.stack([b, empty, empty])
  np.testing.assert_allclose(scores.iou(pred, target), [1 / 3, 1.0, 0.0])
  np.testing.assert_allclose(scores.mean_iou(pred, target), (1 / 3 + 1.0) / 3)
  np.testing.assert_allclose(scores.mean_iou(pred, target, empty=np.nan), (1 / 3) / 2)
  assert np.isnan(scores.mean_iou(empty[None], empty[None], empty=np.nan))


def _masks(*blocks, shape=(6, 6)):
  return np.stack([_block(shape, r, c) for r, c in blocks]) if blocks else np.zeros((0,) + shape)


def test_ap50_known_values():
  g1, g2 = ((0, 2), (0, 2)), ((3, 6), (3, 6))
  wrong = ((0, 2), (3, 6))
  gt = _masks(g1, g2)
  assert scores.ap50(gt, np.array([0.3, 0.9]), gt) == 1.0
  assert scores.ap50(_masks(), np.zeros(0), gt) == 0.0
  assert np.isnan(scores.ap50(gt, np.array([0.5, 0.5]), _masks()))
  # One instance, a wrong prediction ranked above the correct one: recall [0, 1], precision
  # [0, 1/2] -> interpolated 1/2 at every recall level.
  assert scores.ap50(_masks(wrong, g1), np.array([0.9, 0.8]), _masks(g1)) == pytest.approx(0.5)
  # Two instances, ranking TP, FP, TP: recall [.5, .5, 1], precision [1, .5, 2/3] ->
  # interpolated 1 on the 51 levels t <= 0.5, 2/3 on the 50 levels above.
  ap = scores.ap50(_masks(g1, wrong, g2), np.array([0.9, 0.8, 0.7]), gt)
  assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)
  # Pooled over images: FP(0.9, image 2), TP(0.5, image 1), TP(0.4, image 2) -> 2/3.
  ap = scores.ap50_dataset(
    [_masks(g1), _masks(wrong, g2)],
    [np.array([0.5]), np.array([0.9, 0.4])],
    [_masks(g1), _masks(g2)],
  )
  assert ap == pytest.approx(2 / 3)


def test_ap50_matching_threshold_and_one_match_per_instance():
  two = np.zeros((1, 2, 2), dtype=bool)
  two[0, 0, :] = True
  one = np.zeros((1, 2, 2), dtype=bool)
  one[0, 0, 0] = True
  assert scores.ap50(two, np.array([1.0]), one) == 1.0  # IoU exactly 0.5 matches.
  # A duplicate of a matched prediction is a false positive: recall [1, 1], precision [1, .5].
  s, tp = scores.match_instances(np.concatenate([one, one]), np.array([0.2, 0.7]), one)
  np.testing.assert_array_equal(s, [0.7, 0.2])
  np.testing.assert_array_equal(tp, [True, False])
  assert scores.ap50(np.concatenate([one, one]), np.array([0.2, 0.7]), one) == 1.0


# --------------------------------------------------------------------------------------
# scores: head semantics, selection, baselines.
# --------------------------------------------------------------------------------------


def _stripe_parts(rng, num_images):
  """`(B, 6, 6)` part labels: row 0 background, then three 2-column stripes in random order."""
  parts = np.zeros((num_images, 6, 6), dtype=int)
  for b in range(num_images):
    order = rng.permutation(3) + 1
    for s in range(3):
      parts[b, 1:, 2 * s : 2 * s + 2] = order[s]
  return parts


def test_head_part_consistency_perfect_random_and_mixed_heads():
  rng = np.random.default_rng(8)
  num_images = 150
  parts = _stripe_parts(rng, num_images)
  maps_ = np.empty((num_images, 3, 6, 6))
  maps_[:, 0] = np.where(parts == 2, 1.0, 0.0) + 0.01  # always part type 2 (+ a little elsewhere).
  maps_[:, 1] = rng.uniform(size=(num_images, 6, 6))  # random: equal-area parts, uniform choice.
  mixed_target = np.where(rng.uniform(size=num_images) < 0.7, 3, rng.integers(1, 4, num_images))
  maps_[:, 2] = (parts == mixed_target[:, None, None]) + 0.01  # part 3 on ~80 % of images.
  res = scores.head_part_consistency(maps_, parts, 3)
  assert res.chance == pytest.approx(1 / 3)
  assert res.num_valid == num_images
  assert res.consistency[0] == 1.0 and res.modal[0] == 2
  assert np.all(res.preferred[:, 0] == 2)
  assert res.modal[2] == 3
  np.testing.assert_allclose(res.consistency[2], np.mean(mixed_target == 3))
  # Random head: the post hoc modal part biases the score up by about one standard error
  # (sqrt(2/9 / 150) = 0.04); allow 3 of them above chance and 1 below.
  assert res.chance - 0.04 < res.consistency[1] < res.chance + 0.12
  assert res.consistency[0] > res.consistency[2] > res.consistency[1]
  assert scores.best_head(res.consistency) == 0
  # Head 0: 1.01 on the 10 type-2 pixels, 0.01 on the other 26.
  np.testing.assert_allclose(res.mass[:, 0], np.broadcast_to([0.1, 10.1, 0.1], (150, 3)) / 10.36)


def test_head_part_consistency_chance_with_missing_parts_and_leading_axes():
  parts = np.zeros((3, 2, 2), dtype=int)
  parts[0] = [[1, 2], [0, 0]]  # types {1, 2}
  parts[1] = [[1, 1], [0, 0]]  # type {1}
  # image 2: background only -> not valid.
  m = np.ones((2, 3, 1, 2, 2))  # (L, B, K, h, w): uniform maps.
  m[1, :, 0, 0, 1] = 5.0  # layer 1 puts most mass on pixel (0, 1).
  res = scores.head_part_consistency(m, parts, 2)
  assert res.num_valid == 2
  assert res.chance == pytest.approx(max((1 / 2 + 1) / 2, (1 / 2 + 0) / 2))
  assert res.mass.shape == (2, 3, 1, 2) and res.consistency.shape == (2, 1)
  np.testing.assert_allclose(res.mass[0, 0, 0], [0.25, 0.25])
  np.testing.assert_allclose(res.mass[1, 0, 0], [1 / 8, 5 / 8])
  np.testing.assert_array_equal(res.preferred[1, :, 0], [2, 1, 0])  # image 2: none.
  np.testing.assert_array_equal(res.preferred[0, :, 0], [1, 1, 0])  # tie -> lowest type.
  np.testing.assert_allclose(res.consistency[:, 0], [1.0, 0.5])


def test_best_head_and_baselines():
  assert scores.best_head(np.array([0.1, np.nan, 0.7, 0.7])) == 2
  assert scores.best_head(np.array([[0.1, 0.2], [0.9, 0.3]])) == (1, 0)
  with pytest.raises(ValueError):
    scores.best_head(np.array([np.nan]))
  train = np.stack([_block((4, 4), (0, 2), (0, 2)), _block((4, 4), (0, 2), (0, 4))])
  prior = scores.position_prior(train)
  np.testing.assert_allclose(prior[0], [1.0, 1.0, 0.5, 0.5])
  np.testing.assert_allclose(prior[2:], 0.0)
  blob = scores.centred_blob((5, 7), sigma=0.2)
  assert blob.shape == (5, 7) and blob[2, 3] == 1.0
  np.testing.assert_allclose(blob, blob[::-1, ::-1])
  np.testing.assert_allclose(blob[2, 4], np.exp(-((1 / 7) ** 2) / (2 * 0.2**2)))
  # A centred object is perfectly ranked by the blob; a corner object worse than chance.
  assert scores.auroc(blob, _block((5, 7), (1, 4), (2, 5))) == 1.0
  assert scores.auroc(blob, _block((5, 7), (0, 2), (0, 2))) < 0.5
