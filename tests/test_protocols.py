"""Each paper's downstream protocol as its authors' code runs it (issue 26): USFM's timm cosine
schedule, weight-decay groups, validation cadence and segmentation flips; DeblurringMIM's early
stopping; the presets that select them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mae_jax.corrupt import augment
from mae_jax.train import downstream, lr_decay, optim
from tests.conftest import load_config


@pytest.mark.parametrize("warmup,total,warmup_lr,min_lr", [(20, 200, 3e-5, 1e-7), (7, 50, 0.0, 0.0)])
def test_timm_cosine_is_timms_scheduler_as_usfm_steps_it(warmup, total, warmup_lr, min_lr):
  """usdsgen/utils/lr_scheduler.py builds timm's CosineLRScheduler(t_initial=num_steps,
  warmup_t=warmup_steps, warmup_lr_init, lr_min, t_in_epochs=False); the trainer calls
  step_update(epoch · num_steps + idx) after each optimiser step. Record the lr each update used."""
  from timm.scheduler import CosineLRScheduler
  peak = 1e-3
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
  sched = CosineLRScheduler(opt, t_initial=total, lr_min=min_lr, warmup_lr_init=warmup_lr,
                            warmup_t=warmup, cycle_limit=1, t_in_epochs=False)
  used = []
  for g in range(total + 5):
    used.append(opt.param_groups[0]["lr"])
    sched.step_update(g)
  ours = optim.timm_cosine(peak, warmup_lr, warmup, total, min_lr)
  np.testing.assert_allclose([float(ours(g)) for g in range(total + 5)], used, rtol=1e-5, atol=1e-6 * peak)


def _params():
  d = 8
  return {"encoder": {"cls_token": jnp.zeros((1, 1, d)), "pos_embed": jnp.zeros((1, 5, d)),
                      "patch_embed": {"proj": {"kernel": jnp.zeros((4, 4, 1, d)), "bias": jnp.zeros(d)}},
                      "blocks": {"0": {"attn": {"relative_position_bias_table": jnp.zeros((9, 2)),
                                                "qkv": {"kernel": jnp.zeros((d, 3 * d)),
                                                        "bias": jnp.zeros(3 * d)}},
                                       "gamma_1": jnp.zeros(d), "norm1": {"scale": jnp.zeros(d)}}}},
          "head": {"kernel": jnp.zeros((d, 2)), "bias": jnp.zeros(2)}}


def test_weight_decay_groups():
  flat = lambda m: {"/".join(str(getattr(k, "key", k)) for k in p): v  # noqa: E731
                    for p, v in jax.tree_util.tree_flatten_with_path(m)[0]}
  mae = flat(lr_decay.weight_decay_mask(_params(), "mae"))
  usfm = flat(lr_decay.weight_decay_mask(_params(), "usfm"))
  none = flat(lr_decay.weight_decay_mask(_params(), "none"))
  decayed_usfm = {k for k, v in usfm.items() if v}
  # USFM: decay on every parameter of ndim > 1 except pos_embed and cls_token (its no_weight_decay);
  # the relative-position table (2-D) is decayed.
  assert decayed_usfm == {"encoder/patch_embed/proj/kernel",
                          "encoder/blocks/0/attn/relative_position_bias_table",
                          "encoder/blocks/0/attn/qkv/kernel", "head/kernel"}
  assert not mae["encoder/blocks/0/attn/relative_position_bias_table"]
  assert all(none.values())
  with pytest.raises(ValueError, match="train.no_decay"):
    lr_decay.weight_decay_mask(_params(), "bogus")


def test_validation_cadence_is_usfms():
  """cls_trainer.py validates when epoch % val_freq == 0 on 0-based epochs."""
  c = load_config("finetune", "smoke,paper=usfm,init_from=x")
  assert c.eval.every_epochs == 5
  ours = [e for e in range(1, 31) if downstream.validates(c, e)]
  assert ours == [e0 + 1 for e0 in range(30) if e0 % 5 == 0]
  assert all(downstream.validates(load_config("finetune", "smoke,init_from=x"), e) for e in range(1, 9))


def _deblurringmim_last_epoch(accs, patience):
  """main_finetune.py's loop (0-based epochs): stop at the top of an epoch once
  epoch − max_epoch > early_stops; improvements are strict. Returns the last trained epoch, 1-based."""
  max_acc, max_epoch = 0.0, -1
  for epoch in range(len(accs)):
    if epoch - max_epoch > patience and max_epoch != -1:
      return epoch
    if accs[epoch] > max_acc:
      max_acc, max_epoch = accs[epoch], epoch
  return len(accs)


@pytest.mark.parametrize("best_at", [0, 3, 10])
def test_early_stopping_matches_deblurringmim(best_at):
  c = load_config("finetune", "smoke,paper=deblur,init_from=x")
  assert c.train.early_stop_epochs == 200
  c.train.early_stop_epochs = 4
  accs = [0.1 * (1 + min(e, best_at)) for e in range(30)]  # improves until best_at, flat after
  best, last = 0, None
  for epoch in range(1, 31):
    if accs[epoch - 1] > (accs[best - 1] if best else 0.0):
      best = epoch
    if downstream.early_stop(c, epoch, best):
      last = epoch
      break
  assert last == _deblurringmim_last_epoch(accs, 4)


@pytest.mark.parametrize("vflip,rot90", [(True, True), (False, True), (True, False), (False, False)])
def test_flip_rot90_keeps_image_and_mask_together(vflip, rot90):
  rng = np.random.default_rng(0)
  x = rng.random((64, 8, 8, 1)).astype(np.float32)
  m = (np.arange(64)[:, None, None, None] + np.arange(64).reshape(1, 8, 8, 1)).astype(np.uint8)
  y, ym = augment.flip_rot90(jax.random.key(1), jnp.asarray(x), jnp.asarray(m), vflip=vflip, rot90=rot90)
  y, ym = np.asarray(y), np.asarray(ym)
  seen = set()
  for i in range(64):
    found = None
    for k in range(4):
      for f in (False, True):
        cand = np.rot90(x[i], k, axes=(0, 1))
        cand = cand[::-1] if f else cand
        if np.array_equal(cand, y[i]):
          found = (k, f)
          mc = np.rot90(m[i], k, axes=(0, 1))
          np.testing.assert_array_equal(mc[::-1] if f else mc, ym[i])
    assert found is not None
    assert (found[0] == 0 or rot90) and (not found[1] or vflip)
    seen.add(found)
  assert len(seen) == (1 + 3 * rot90) * (1 + vflip)  # every allowed transform occurs in 64 draws


def test_presets_follow_the_authors_code():
  u = load_config("finetune", "paper=usfm,init_from=x")
  assert (u.eval.select, u.eval.every_epochs, u.train.schedule, u.train.no_decay) == (
      "balanced_accuracy", 5, "timm_cosine", "usfm")
  assert (u.data.crop_scale_min, u.data.hflip) == (1.0, False)
  assert u.train.warmup_lr == pytest.approx(2.5e-4 * 64 / 512)
  s = load_config("segment", "paper=usfm,init_from=x")
  assert (s.train.layer_decay, s.train.no_decay, s.train.weight_decay) == (1.0, "none", 0.05)
  assert (s.data.rot90, s.data.vflip, s.data.hflip, s.data.crop_scale_min) == (True, True, True, 1.0)
  assert s.eval.every_epochs == 5 and s.train.schedule == "timm_cosine"
  d = load_config("finetune", "paper=deblur,init_from=x")
  assert (d.train.base_lr, d.train.layer_decay, d.train.weight_decay, d.train.no_decay) == (
      1e-3, 1.0, 0.01, "none")
  assert (d.train.early_stop_epochs, d.train.decay_epochs, d.train.label_smoothing) == (200, 10**7, 0.1)
  assert (d.train.randaugment, d.train.random_erasing) == ("rand-m9-mstd0.5-inc1", 0.25)
  # the defaults are unchanged
  f = load_config("finetune", "init_from=x")
  assert (f.eval.select, f.eval.every_epochs, f.train.schedule, f.train.no_decay) == (
      "macro_f1", 1, "warmup_cosine", "mae")


def test_schedule_for_spans_decay_epochs():
  c = load_config("finetune", "paper=deblur,init_from=x")
  steps = optim.Steps(per_epoch=10, total=10_000, warmup=50)
  sched = downstream.schedule_for(c.train, 1e-3, steps)
  # the cosine over 10^7 epochs has barely moved after 1,000 epochs: a constant lr in practice
  assert float(sched(10_000)) == pytest.approx(1e-3, rel=1e-4)
  assert float(sched(25)) == pytest.approx(0.5e-3)


def test_random_erasing_boxes_match_timms_distribution():
  """One box per erased sample, filled with N(0, 1), the rest untouched; the box sizes follow timm's
  RandomErasing(mode='pixel') (compared by the mean and quartiles of the erased fraction)."""
  from timm.data.random_erasing import RandomErasing
  n, s = 2000, 32
  x = jnp.full((n, s, s, 1), 7.0)
  y = np.asarray(augment.random_erasing(jax.random.key(0), x, 1.0))
  changed = y != 7.0
  fracs = changed.reshape(n, -1).mean(1)
  for i in range(0, n, 97):
    rows, cols = np.nonzero(changed[i, ..., 0])
    assert changed[i, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
  assert abs(y[changed].mean()) < 0.02 and abs(y[changed].std() - 1) < 0.02
  torch.manual_seed(0)
  import random
  random.seed(0)
  eraser = RandomErasing(probability=1.0, mode="pixel", device="cpu")
  ref = np.array([float((eraser(torch.full((1, s, s), 7.0)) != 7.0).float().mean()) for _ in range(n)])
  assert abs(fracs.mean() - ref.mean()) < 0.01
  np.testing.assert_allclose(np.quantile(fracs, [0.25, 0.5, 0.75]), np.quantile(ref, [0.25, 0.5, 0.75]),
                             atol=0.02)
  none = np.asarray(augment.random_erasing(jax.random.key(1), x, 0.0))
  assert (none == 7.0).all()
  some = np.asarray(augment.random_erasing(jax.random.key(2), x, 0.25))
  rate = (some != 7.0).reshape(n, -1).any(1).mean()
  assert abs(rate - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)
