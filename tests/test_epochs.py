"""One epoch definition (issue 26, item 5): ⌊N/B⌋ steps (the official MAE's `drop_last=True` loader)
for the total, the warm-up, the schedule and the training iterator."""

import ml_collections
import numpy as np
import pytest

from mae_jax.data import pipeline
from mae_jax.data.sampling import EpochShuffleSampler
from mae_jax.train import optim, pretrain


def _train(**kw):
  t = ml_collections.ConfigDict({"batch_size": 1024, "epochs": 800.0, "warmup_epochs": 40.0,
                                 "total_steps": 0})
  t.update(kw)
  return t


def test_the_issue_example_2000_images_batch_1024():
  # ⌊2000 / 1024⌋ = 1 step an epoch: 800 steps, 40 of warm-up (N/B would give 1563 steps).
  s = optim.Steps.of(_train(), 2000)
  assert (s.per_epoch, s.total, s.warmup) == (1, 800, 40)


@pytest.mark.parametrize("n, b, epochs, warmup_epochs, want", [
    (2000, 256, 2.5, 1.0, (7, 18, 7)),  # ⌊2000/256⌋ = 7; ⌈2.5·7⌉ = 18; 1·7 = 7
    (256, 64, 3.0, 0.5, (4, 12, 2)),  # B divides N: 4; 12; round(0.5·4) = 2
    (100, 128, 5.0, 1.0, (1, 5, 1)),  # a split smaller than a batch: one (wrapped) batch an epoch
    (1000, 100, 1.0, 5.0, (10, 10, 10)),  # the warm-up never passes the end
])
def test_steps_by_hand(n, b, epochs, warmup_epochs, want):
  s = optim.Steps.of(_train(batch_size=b, epochs=epochs, warmup_epochs=warmup_epochs), n)
  assert (s.per_epoch, s.total, s.warmup) == want


def test_total_steps_wins_and_pretraining_counts_the_same():
  c = ml_collections.ConfigDict({"train": _train(total_steps=37)})
  assert pretrain.total_steps(c, 2000) == (37, 37)
  c.train.total_steps = 0
  assert pretrain.total_steps(c, 2000) == (800, 40)


def test_schedule_peaks_after_the_warm_up_and_ends_at_min_lr():
  s = optim.Steps.of(_train(batch_size=256, epochs=2.5, warmup_epochs=1.0), 2000)  # 18 steps, 7 warm-up
  lr = optim.warmup_cosine(1.0, s.warmup, s.total, 0.1)
  assert float(lr(0)) == 0.0 and float(lr(3)) == pytest.approx(3 / 7, rel=1e-6)
  assert float(lr(7)) == pytest.approx(1.0, rel=1e-6)
  # half-way through the cosine part (step 7 + 11/2): (1 + 0.1) / 2
  assert float(lr(7 + 5.5)) == pytest.approx(0.55, rel=1e-6)
  assert float(lr(18)) == pytest.approx(0.1, rel=1e-6)


def _source(n):
  return [{"image": np.full((8, 8, 1), i, np.uint8), "index": i} for i in range(n)]


def test_the_iterator_drops_the_last_partial_batch_of_each_epoch():
  n, b, seed = 10, 4, 3  # ⌊10/4⌋ = 2 batches an epoch; 2 records of each permutation unused
  it = pipeline.train_iterator(_source(n), global_batch=b, image_size=8, seed=seed, hflip=False)
  idx = [np.asarray(next(it)["index"]) for _ in range(6)]
  perm = EpochShuffleSampler(n, seed).permutation
  for e in range(3):
    got = np.concatenate(idx[2 * e: 2 * e + 2])
    np.testing.assert_array_equal(got, perm(e)[:8])  # each epoch: a fresh permutation's first 8
    assert len(set(got)) == 8
  # Resuming at a batch number gives the same stream.
  it2 = pipeline.train_iterator(_source(n), global_batch=b, image_size=8, seed=seed, hflip=False,
                                start_batch=3)
  np.testing.assert_array_equal(np.asarray(next(it2)["index"]), idx[3])
