"""edmlab.metrics.precision_recall: improved precision and recall (k-NN radii), exact on small point sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edmlab.metrics import precision_recall as prm


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((200, 16))
    assert prm.precision_recall(real, real, device="cpu") == (1.0, 1.0)
    assert prm.precision_recall(real, real + 100, device="cpu") == (0.0, 0.0)


def test_knn_radii_and_precision_on_a_line():
    line = lambda xs: np.pad(np.asarray(xs, np.float64)[:, None], ((0, 0), (0, 3)))  # on an axis of R^4
    real = line(range(10))
    radii = prm.knn_radii(real, k=3, dtype=torch.float64)
    np.testing.assert_allclose(radii.numpy(), [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])
    # 11.9 is within 3 of 9 and -3.0 exactly 3 from 0 (boundary counts); 12.5 and -3.5 are outside every ball.
    fake = line([11.9, 12.5, 4.5, -3.0, -3.5])
    precision, recall = prm.precision_recall(real, fake, k=3, dtype=torch.float64, device="cpu")
    assert precision == pytest.approx(3 / 5)
    assert recall == 1.0  # the fake radii (>= 8) cover 0..9
    with pytest.raises(ValueError, match=r"k=3 needs at least k \+ 1 = 4 points"):
        prm.knn_radii(real[:3], k=3)


def test_precision_recall_blocked_equals_brute_force():
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((57, 5)), rng.standard_normal((43, 5)) * 1.3 + 0.4

    def brute(support, queries, k):
        d_ss = np.linalg.norm(support[:, None] - support[None], axis=-1)
        radii = np.sort(d_ss, axis=1)[:, k]
        d_qs = np.linalg.norm(queries[:, None] - support[None], axis=-1)
        return (d_qs <= radii).any(axis=1).mean()

    for k in (1, 3, 5):
        got = prm.precision_recall(real, fake, k=k, block=7, dtype=torch.float64, device="cpu")
        assert got == pytest.approx((brute(real, fake, k), brute(fake, real, k)), abs=1e-12)
        assert 0 < got[0] < 1 and 0 < got[1] < 1
