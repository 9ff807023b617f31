"""Per-seed draws: the seed parser, the split over ranks, SeedGenerator, class labels, batches, the preview grid."""

import numpy as np
import pytest
import torch
from test_generate import CHURN, HEUN, one_thread, pixels, tiny_denoiser  # noqa: F401 - one_thread: autouse

from edmlab.generation import (
    Batch,
    SeedGenerator,
    batches_for_rank,
    draw_labels,
    generate_batch,
    iterate_batches,
    parse_seeds,
)


def test_parse_seeds_one_rule_for_sample_py_and_fid():
    """One parser for sample.py seeds=, scripts/fid.py --seeds and compute_stats: inclusive ranges, each seed once."""
    from edmlab.metrics import EDM_SEED_RANGES, compute_stats
    from edmlab.metrics import fid as metrics_fid

    assert metrics_fid.parse_seeds is parse_seeds and compute_stats.__module__ == "edmlab.metrics.fid"
    assert parse_seeds("0-9,20,30-31") == [*range(10), 20, 30, 31]
    assert parse_seeds("0-3,7, 9-10") == [0, 1, 2, 3, 7, 9, 10]  # spaces are ignored
    assert parse_seeds(["0-2", 5, "7"]) == [0, 1, 2, 5, 7]
    assert parse_seeds(range(3, 6)) == [3, 4, 5] and parse_seeds(7) == [7] and parse_seeds("4") == [4]
    assert parse_seeds([9, 2]) == [9, 2]  # the order is kept
    assert parse_seeds("0-49999")[-1] == 49999 and len(parse_seeds("0-49999")) == 50000
    assert parse_seeds(EDM_SEED_RANGES[2]) == list(range(100_000, 150_000))
    for bad, message in [("5-3", r"range '5-3' is empty; write it low-high, e.g. 3-5"),
                         ("x", r"cannot read 'x'; use non-negative integers and inclusive ranges, e.g. 0-49999"),
                         ("a-b", "cannot read 'a-b'"), ("-1", "cannot read '-1'"), ([-1], "cannot read '-1'"),
                         ("1,0-2", "seed 1 appears more than once in '1,0-2'; list every seed once"),
                         ([5, 5], "seed 5 appears more than once"), ("", "names no seed; e.g. 0-49999"),
                         ([], "names no seed"), (True, "expected non-negative integers")]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)


def test_batches_for_rank_partition_the_seeds_in_the_same_batches():
    seeds = parse_seeds("0-20,40")
    single = batches_for_rank(seeds, 4)
    assert [s for b in single for s in b] == seeds and all(len(b) <= 4 for b in single)
    for world in (2, 3, 7):
        shards = [batches_for_rank(seeds, 4, r, world) for r in range(world)]
        assert sorted(map(tuple, (b for shard in shards for b in shard))) == sorted(map(tuple, single))


def test_seed_generator_draws_per_seed():
    """Row i of every draw comes from torch.Generator(seed_i mod 2^32) alone, whatever the batch."""
    rng = SeedGenerator([3, 2**32 + 3, 7])
    noise, ints = rng.randn([2, 2]), rng.randint(10)
    assert len(rng) == 3 and noise.shape == (3, 2, 2) and noise.dtype == torch.float32 and ints.shape == (3,)
    g = torch.Generator().manual_seed(7)
    np.testing.assert_array_equal(noise[2], torch.randn(2, 2, generator=g))
    assert ints[2] == torch.randint(10, (), generator=g)  # the next draw of the same stream
    np.testing.assert_array_equal(noise[0], noise[1])  # seed mod 2^32
    assert len(rng.generators) == 3 and rng.generators[2].initial_seed() == 7


def test_class_label_modes():
    seeds = [0, 1, 2, 5, 11]
    random = draw_labels(SeedGenerator(seeds), 4, "random")
    expected = [torch.randint(4, (), generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert random.tolist() == [e.item() for e in expected]  # one draw per seed's generator (latents skipped here)
    assert draw_labels(SeedGenerator(seeds), 4, "all").tolist() == [s % 4 for s in seeds]
    assert draw_labels(SeedGenerator(seeds), 4, 2).tolist() == [2] * 5
    assert draw_labels(SeedGenerator(seeds), 4, "2").tolist() == [2] * 5
    assert draw_labels(SeedGenerator(seeds), 4, [3, 0, 1, 1, 2]).tolist() == [3, 0, 1, 1, 2]  # one per seed
    assert draw_labels(SeedGenerator(seeds), 0, "random") is None
    rng, reference = SeedGenerator(seeds), SeedGenerator(seeds)
    draw_labels(rng, 4, [0] * 5)  # a given class still takes the random draw, as EDM does,
    reference.randint(4)          # so the sampler's noise that follows is the same as with a random class
    assert torch.equal(rng.randn([3]), reference.randn([3]))
    with pytest.raises(ValueError, match="unconditional"):
        draw_labels(SeedGenerator(seeds), 0, 1)
    with pytest.raises(ValueError, match=r"class_labels=4 is not a class of this network \(0 .. 3\)"):
        draw_labels(SeedGenerator(seeds), 4, 4)
    with pytest.raises(ValueError, match="class_labels=-1 is not a class"):
        draw_labels(SeedGenerator(seeds), 4, [0, 1, 2, 3, -1])
    with pytest.raises(ValueError, match="2 classes for 5 seeds; give one class per seed"):
        draw_labels(SeedGenerator(seeds), 4, [0, 1])
    with pytest.raises(ValueError, match="use a class index, 'random', 'all' or one class per seed"):
        draw_labels(SeedGenerator(seeds), 4, "every")


def test_iterate_batches_gives_each_rank_its_chunks_and_skips_written_ones():
    denoiser = tiny_denoiser(label_dim=3)
    seeds = [0, 1, 2, 3, 4, 5, 6]
    classes = [2, 1, 0, 2, 1, 0, 2]
    ranks = [list(iterate_batches(denoiser, seeds, HEUN, batch_size=3, rank=r, world_size=2, class_labels=classes))
             for r in range(2)]
    assert [(b.index, b.seeds) for b in ranks[0]] == [(0, [0, 1, 2]), (2, [6])]
    assert [(b.index, b.seeds) for b in ranks[1]] == [(1, [3, 4, 5])]
    for b in ranks[0] + ranks[1]:
        assert isinstance(b, Batch) and b.labels.tolist() == [classes[s] for s in b.seeds]  # one class per seed
        images, labels = generate_batch(denoiser, b.seeds, HEUN, class_labels=b.labels.tolist())
        assert torch.equal(b.images, images) and torch.equal(b.labels, labels)
    resumed = list(iterate_batches(denoiser, seeds, HEUN, batch_size=3, skip={0, 1, 2, 6}))
    assert [b.seeds for b in resumed] == [[3, 4, 5]]  # a batch with one missing seed is computed whole
    assert list(iterate_batches(denoiser, seeds, HEUN, batch_size=3, skip=set(seeds))) == []
    with pytest.raises(ValueError, match="2 classes for 7 seeds; give one class per seed"):
        next(iterate_batches(denoiser, seeds, HEUN, batch_size=3, class_labels=[0, 1]))


@pytest.mark.parametrize("label_dim", [3, 0], ids=["conditional", "unconditional"])
def test_preview_grid_shows_sample_py_images(label_dim):
    """Preview cell for seed s (row r: class r) == generate_batch's (sample.py's) image of seed s and class r."""
    from types import SimpleNamespace

    from edmlab.training.samples import draw_samples

    denoiser = tiny_denoiser(label_dim=label_dim, dtype=torch.float64)  # float64: bytes do not depend on the batch
    module = SimpleNamespace(ema=SimpleNamespace(module=denoiser), data_shape=[1, 8, 8], label_dim=label_dim,
                             device="cpu")
    picture = np.asarray(draw_samples(module, CHURN, per_class=2, num_unconditional=4, seed=5))
    ncol = 2
    for i, seed in enumerate(range(5, 5 + (3 * 2 if label_dim else 4))):
        row, col = divmod(i, ncol)
        cell = picture[1 + row * 9:9 + row * 9, 1 + col * 9:9 + col * 9]  # 8x8 images, 1 px padding
        expected = pixels(generate_batch(denoiser, [seed], CHURN, class_labels=row if label_dim else "random")[0])
        np.testing.assert_array_equal(cell, expected[0, ..., 0])
    assert len(np.unique(picture)) > 20
