"""insightface's 5-point alignment: the similarity fit recovers a known similarity, the warp
samples as cv2.warpAffine does (compared with cv2 itself when it is installed)."""

import numpy as np
import pytest

from persona_jax.face import align


def _similarity(scale, angle, shift):
  c, s = np.cos(angle), np.sin(angle)
  return np.asarray([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


@pytest.mark.parametrize("scale,angle,shift", [(1.0, 0.0, (0.0, 0.0)), (0.37, 0.6, (-12.5, 40.0)),
                                               (2.5, -2.8, (100.0, -3.25))])
def test_similarity_transform_recovers_a_known_similarity(scale, angle, shift):
  m = _similarity(scale, angle, shift)
  src = align.ARCFACE_TEMPLATE_112.astype(np.float64)
  dst = src @ m[:, :2].T + m[:, 2]
  np.testing.assert_allclose(align.similarity_transform(src, dst), m, atol=1e-5)
  # The inverse direction is the inverse similarity.
  back = align.similarity_transform(dst, src)
  np.testing.assert_allclose(back[:, :2] @ m[:, :2], np.eye(2), atol=1e-5)


def test_similarity_transform_is_the_least_squares_fit_of_noisy_points():
  rng = np.random.default_rng(0)
  src = align.ARCFACE_TEMPLATE_112 + rng.normal(0, 2, (5, 2))
  m = align.similarity_transform(src, align.ARCFACE_TEMPLATE_112)

  def error(mm):
    return np.sum((src @ mm[:, :2].T + mm[:, 2] - align.ARCFACE_TEMPLATE_112) ** 2)
  for _ in range(20):          # nudging scale, angle or shift only makes the fit worse
    scale, angle = np.hypot(*m[:, 0]), np.arctan2(m[1, 0], m[0, 0])
    d = rng.normal(0, 1e-3, 4)
    assert error(_similarity(scale * (1 + d[0]), angle + d[1], m[:, 2] + d[2:])) >= error(m)


def test_arcface_templates_follow_insightface():
  np.testing.assert_allclose(align.arcface_template(224), align.ARCFACE_TEMPLATE_112 * 2)
  np.testing.assert_allclose(align.arcface_template(128), align.ARCFACE_TEMPLATE_112 + [8.0, 0.0])
  np.testing.assert_allclose(align.arcface_template(256), align.ARCFACE_TEMPLATE_112 * 2 + [16.0, 0.0],
                             rtol=1e-6)


def test_warp_affine_with_an_integer_shift_is_a_slice():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  out = align.warp_affine(image, [[1.0, 0.0, -3.0], [0.0, 1.0, -5.0]], 12)   # crop at (x 3, y 5)
  np.testing.assert_array_equal(out, image[5:17, 3:15])
  out = align.warp_affine(image, [[1.0, 0.0, 4.0], [0.0, 1.0, 2.0]], 16)     # zeros come in
  np.testing.assert_array_equal(out[2:, 4:], image[:14, :12])
  assert not out[:2].any() and not out[:, :4].any()
  half = align.warp_affine(image.astype(np.float32), [[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]], 8)
  np.testing.assert_allclose(half, 0.5 * (image[:8, :8] + image[:8, 1:9].astype(np.float32)),
                             rtol=1e-6)
  assert half.dtype == np.float32


def test_norm_crop_puts_keypoints_on_the_template():
  # Five bright dots at known places: after alignment each lies on its template point.
  image = np.zeros((96, 80, 3), np.uint8)
  m = _similarity(0.6, 0.3, (10.0, 20.0))
  points = align.ARCFACE_TEMPLATE_112 @ m[:, :2].T + m[:, 2]
  points = np.round(points)                               # dots on pixel centres
  for x, y in points.astype(int):
    image[y, x] = 255
  crop = align.norm_crop(image, points, 112)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  for x, y in align.ARCFACE_TEMPLATE_112:
    window = crop[int(y) - 2: int(y) + 3, int(x) - 2: int(x) + 3, 0]
    assert window.max() > 100


def test_warp_affine_matches_cv2():
  cv2 = pytest.importorskip("cv2")
  # A smooth image: cv2 rounds sample positions to 1/32 pixel, which moves sharp edges' values.
  rng = np.random.default_rng(2)
  yy, xx = np.mgrid[0:40, 0:50]
  image = np.stack([127 + 100 * np.sin(xx / 5 + c) * np.cos(yy / 7) for c in range(3)], -1)
  image = image.round().astype(np.uint8)
  points = align.ARCFACE_TEMPLATE_112 * 0.3 + rng.normal(0, 1, (5, 2)) + 5
  m = align.similarity_transform(points, align.arcface_template(112))
  ours = align.warp_affine(image, m, 112).astype(int)
  theirs = cv2.warpAffine(image, m, (112, 112), borderValue=0.0).astype(int)
  assert np.abs(ours - theirs).max() <= 1
  ours = align.warp_affine(image.astype(np.float32), m, 112)
  theirs = cv2.warpAffine(image.astype(np.float32), m, (112, 112), borderValue=0.0)
  np.testing.assert_allclose(ours, theirs, atol=0.6)
