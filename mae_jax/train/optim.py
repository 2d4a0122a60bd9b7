"""Optimizers, learning-rate schedules and the length of a run in steps (layer-wise lr decay:
`lr_decay.py`).

One epoch is ⌊N/B⌋ steps (the last partial batch dropped, as the official MAE's `drop_last=True`
loader): the total, the warm-up and the training iterator (`pipeline.train_iterator`) all count it so.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """⌊N/B⌋, at least 1 (a split smaller than one batch still trains, one wrapped batch a step)."""
  return max(1, int(num_examples) // int(batch_size))


@dataclasses.dataclass(frozen=True)
class Steps:
  """Step counts of a run: `train.total_steps` when set, else ⌈epochs · ⌊N/B⌋⌉; the warm-up is
  round(warmup_epochs · ⌊N/B⌋), never past the end."""
  per_epoch: int
  total: int
  warmup: int

  @classmethod
  def of(cls, train_config, num_examples: int) -> Steps:
    t = train_config
    per_epoch = steps_per_epoch(num_examples, t.batch_size)
    total = int(t.total_steps) or max(1, int(math.ceil(float(t.epochs) * per_epoch)))
    warmup = min(int(round(float(t.get("warmup_epochs", 0.0)) * per_epoch)), total)
    return cls(per_epoch, total, warmup)

  def epoch_ends(self, step: int) -> bool:
    """Whether `step` ends an epoch (the last step ends one too)."""
    return step % self.per_epoch == 0 or step == self.total

  def epoch(self, step: int) -> int:
    return int(math.ceil(step / self.per_epoch))


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
  """Linear warm-up from 0, then half-cosine to `min_lr`, per step (MAE's `adjust_learning_rate`,
  called per iteration with a fractional epoch). optax's decay length includes the warm-up and
  must exceed it."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, int(warmup_steps),
                                            max(int(total_steps), int(warmup_steps) + 1), min_lr)



def timm_cosine(peak_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int,
                min_lr: float = 0.0):
  """timm's CosineLRScheduler as USFM's trainers run it (usdsgen/utils/lr_scheduler.py:
  t_in_epochs=False, warmup_prefix=False, cycle_limit=1): lr(t) = warmup_lr + t·(peak − warmup_lr) /
  warmup_steps during the warm-up, else min_lr + (peak − min_lr)·(1 + cos(π·t / total_steps)) / 2
  — a cosine over all steps, warm-up included — and min_lr from total_steps on. `step_update(t)` runs
  after update t, so update g uses lr(max(g − 1, 0))."""

  def schedule(step):
    t = jnp.maximum(jnp.asarray(step, jnp.float32) - 1.0, 0.0)
    warm = warmup_lr + t * (peak_lr - warmup_lr) / max(warmup_steps, 1)
    cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t / max(total_steps, 1)))
    return jnp.where(t < warmup_steps, warm, jnp.where(t < total_steps, cos, min_lr))

  return schedule

def decay_mask(params):
  """Weight decay on matrices only: biases and norm scales (1-D per block) are exempt, as in MAE;
  a scanned block stack's leading axis does not count."""
  from mae_jax.models import vit
  return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim - vit.stacked_axes(p) > 1, params)


def adamw(schedule, *, b1: float, b2: float, weight_decay: float, grad_clip: float = 0.0,
          mask=decay_mask):
  tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
  if grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx
