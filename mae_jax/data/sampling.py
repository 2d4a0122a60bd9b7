"""Index samplers for the training stream: organ-balanced (USFM Eq. 1) and per-epoch shuffling.

Both samplers map a *draw number* ``k`` (0, 1, 2, ... over the whole run, across processes) to a
dataset index. Draw ``k`` is a pure function of ``(seed, k)``: it never depends on the draws
before it, so resuming a run at any ``k`` reproduces the uninterrupted stream exactly, and the
only state a checkpoint needs is ``k`` itself.

USFM Eq. 1 gives every image of organ ``o`` the sampling weight ``1/√N_o`` (a weighted sampler over
images, "during each input fetch, the image is sampled ... using weights w_sample"). An organ's
share of the draws is then ``N_o · N_o^{-1/2} ∝ √N_o``: rare organs are drawn more often than
their share of the data, without being equalised. With the shares USFM names for 8 of its 12 organs
(§5.1, §5.4: breast 91.74 %, thyroid 3.29 %, fetal body 0.93 %, neck 0.51 %, abdomen 0.43 %, fetal
head 0.39 %, fetal abdomen 0.19 %, muscle 0.07 %) breast gets ≈ 64 % of the draws and muscle ≈ 1.8 %
among those 8; over all 12 organs (the other four hold the remaining 2.45 %) ≈ 52.7 % and ≈ 1.46 %. We draw
the organ with probability ``√N_o / Σ √N`` and then one of its images uniformly, which is that
weighted sampler over images exactly (docs/methods.md#organ-balanced-sampling). ``uniform`` mode (the USFM-woS
ablation) ignores organs and walks through a fresh permutation of the whole dataset every epoch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

__all__ = ["organ_weights", "EpochShuffleSampler", "BalancedIndexSampler"]

def _as_organ_ids(organ_ids: Sequence[int] | np.ndarray) -> np.ndarray:
  ids = np.asarray(organ_ids)
  if ids.ndim != 1 or ids.size == 0:
    raise ValueError(f"organ_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    if np.all(np.mod(ids, 1) == 0):
      ids = ids.astype(np.int64)
    else:
      raise ValueError("organ_ids must be integers")
  if ids.min() < 0:
    raise ValueError(
        "organ_ids must be >= 0 (a negative id means 'no organ'; the balanced sampler needs "
        "an organ for every image)"
    )
  return ids.astype(np.int64)


def organ_weights(organ_ids: Sequence[int] | np.ndarray) -> np.ndarray:
  """Each organ's share of the draws when every image has weight ``1/√N_o`` (USFM Eq. 1):
  ``√N_o / Σ_o' √N_o'``.

  Args:
    organ_ids: organ id of every image in the dataset (non-negative ints).

  Returns:
    float64 array of length ``max(organ_ids) + 1``, indexed by organ id, summing to 1. Organ ids
    with no images get 0.
  """
  ids = _as_organ_ids(organ_ids)
  # N_o images of weight N_o^{-1/2} each: √N_o, computed from the counts rather than by summing
  # the per-image weights, so the shares are exact closed forms.
  w = np.sqrt(np.bincount(ids).astype(np.float64))
  return w / w.sum()


class EpochShuffleSampler:
  """Draw ``k`` → ``perm_e[k mod n]`` with ``e = k // n`` and ``perm_e`` a permutation seeded by
  ``(seed, e)``: every epoch visits every index once, in a fresh deterministic order.

  Thread-safe; the last two epochs' permutations are cached (a prefetching pipeline straddles
  at most one epoch boundary at a time).
  """

  def __init__(self, n: int, seed: int):
    if int(n) <= 0:
      raise ValueError(f"EpochShuffleSampler needs n > 0, got n={n}")
    self.n = int(n)
    self.seed = int(seed)
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"n": self.n, "seed": self.seed}

  def __setstate__(self, state):
    self.__init__(state["n"], state["seed"])

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)
        self._cache[epoch] = perm
        for old in sorted(self._cache)[:-2]:
          del self._cache[old]
      return perm

  def __getitem__(self, k: int) -> int:
    k = int(k)
    if k < 0:
      raise IndexError(f"draw number must be >= 0, got {k}")
    epoch, pos = divmod(k, self.n)
    return int(self.permutation(epoch)[pos])


class BalancedIndexSampler:
  """Deterministic, resumable index sampler over an infinite stream of draws.

  ``mode='balanced'`` (USFM): draw ``k`` uses ``np.random.default_rng([seed, k])`` to pick an
  organ with probability :func:`organ_weights` (∝ √N_o) and then one of its images uniformly, so
  every image is drawn with probability ∝ 1/√N_o (USFM Eq. 1).

  ``mode='uniform'`` (USFM-woS ablation): an :class:`EpochShuffleSampler` over all images.

  ``sampler[k]`` is the dataset index of draw ``k``; ``sampler.draws(start, stop)`` a block of them.
  ``epoch_size`` (= number of images) lets a training loop count nominal epochs.
  """

  def __init__(self, organ_ids: Sequence[int] | np.ndarray, seed: int, mode: str = "balanced"):
    if mode not in ("balanced", "uniform"):
      raise ValueError(f"mode must be 'balanced' or 'uniform', got {mode!r}")
    self.mode = mode
    self.seed = int(seed)
    if mode == "uniform":
      n = len(organ_ids)
      self._shuffle = EpochShuffleSampler(n, seed)
      self.epoch_size = n
      return
    ids = _as_organ_ids(organ_ids)
    self.epoch_size = int(ids.size)
    weights = organ_weights(ids)
    self.organs = np.flatnonzero(weights > 0)
    self.probs = weights[self.organs]
    # Stable sort keeps members of an organ in dataset order, so the mapping from
    # (organ, j) to a dataset index does not depend on numpy's sort algorithm.
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids)[self.organs]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    self._members = [order[s : s + c] for s, c in zip(starts, counts)]
    self._cdf = np.cumsum(self.probs)
    self._cdf[-1] = 1.0

  def __getitem__(self, k: int) -> int:
    k = int(k)
    if k < 0:
      raise IndexError(f"draw number must be >= 0, got {k}")
    if self.mode == "uniform":
      return self._shuffle[k]
    rng = np.random.default_rng([self.seed, k])
    u, v = rng.random(2)
    o = min(int(np.searchsorted(self._cdf, u, side="right")), len(self._cdf) - 1)
    members = self._members[o]
    return int(members[min(int(v * len(members)), len(members) - 1)])

  def draws(self, start: int, stop: int) -> np.ndarray:
    return np.array([self[k] for k in range(start, stop)], dtype=np.int64)
