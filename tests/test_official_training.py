"""Many pretraining steps of the project's train step against the official MAE's training loop
(facebookresearch/mae `main_pretrain.py` + `engine_pretrain.py` + `util/lr_sched.py`), run in torch on
the official-style peer (benchmarks/official_mae_peer.py): AdamW (0.9, 0.95) over the official
parameter groups (timm `add_weight_decay`: no decay on 1-D parameters and biases), the learning rate
set before every optimiser step from the fractional epoch, an epoch of ⌊N/B⌋ steps (`drop_last`),
gradient accumulation over two micro-batches (`accum_iter`). N is not a multiple of B, so an epoch
counted as N/B steps would stretch the cosine and part the two runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mae_jax.corrupt import masking
from mae_jax.train import core, optim, pretrain
from tests import torch_refs
from tests.conftest import load_config

N, B, ACCUM, EPOCHS, WARMUP_EPOCHS = 42, 8, 2, 7, 2  # ⌊42/8⌋ = 5 steps per epoch, 35 in all
BLR, MIN_LR, WD = 0.16, 1e-4, 0.05  # lr = blr · B / 256 = 5e-3: large enough that the schedule matters


def _official_lr(epoch_float, lr):
  """util/lr_sched.adjust_learning_rate."""
  if epoch_float < WARMUP_EPOCHS:
    return lr * epoch_float / WARMUP_EPOCHS
  return MIN_LR + (lr - MIN_LR) * 0.5 * (1.0 + math.cos(
      math.pi * (epoch_float - WARMUP_EPOCHS) / (EPOCHS - WARMUP_EPOCHS)))


def _official_param_groups(model):
  """timm 0.3.2 optim_factory.add_weight_decay, as main_pretrain.py calls it."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
  return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": WD}]


def test_epoch_is_floor_n_over_b():
  config = load_config("mae", "smoke")
  config.train.batch_size, config.train.epochs, config.train.warmup_epochs = B, EPOCHS, WARMUP_EPOCHS
  config.train.total_steps = 0
  assert pretrain.total_steps(config, N) == (EPOCHS * (N // B), WARMUP_EPOCHS * (N // B))
  assert optim.steps_per_epoch(N, B) == N // B == 5


@pytest.mark.parametrize("norm_pix", [False, True])
def test_training_run_matches_the_official_loop(norm_pix):
  torch.manual_seed(0)
  spec, model, sd, peer = torch_refs.micro_mae_and_official_peer(decoder_depth=1, norm_pix=norm_pix,
                                                                 seed=4)
  peer.load_state_dict(sd, strict=True)
  peer.train()
  config = load_config("mae", "smoke")
  config.train.batch_size, config.train.epochs, config.train.warmup_epochs = B, EPOCHS, WARMUP_EPOCHS
  config.train.total_steps, config.train.grad_accum, config.train.min_lr = 0, ACCUM, MIN_LR
  config.model.norm_pix_loss = norm_pix
  mean, std = 0.4, 0.25

  steps, warmup = pretrain.total_steps(config, N)
  peak = BLR * B / 256
  schedule = optim.warmup_cosine(peak, warmup, steps, MIN_LR)
  tx = optim.adamw(schedule, b1=0.9, b2=0.95, weight_decay=WD)
  graphdef, params, rest = core.split_model(model)
  state = core.init_state(params, tx, 0)
  step_fn = jax.jit(pretrain.make_train_step(config, graphdef, tx, schedule, mean, std))

  opt = torch.optim.AdamW(_official_param_groups(peer), lr=peak, betas=(0.9, 0.95))
  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, (N, 32, 32, 1), dtype=np.uint8)
  per_epoch = N // B  # the loader's len with drop_last=True (in optimiser steps)
  ours, theirs = [], []
  for epoch in range(EPOCHS):
    order = rng.permutation(N)
    for k in range(per_epoch):
      batch = data[order[k * B:(k + 1) * B]]
      # The official loop sets the lr at the first micro-batch of a step: data_iter_step / len(loader)
      # + epoch, with len(loader) = ACCUM · per_epoch micro-batches.
      lr = _official_lr((ACCUM * k) / (ACCUM * per_epoch) + epoch, peak)
      for g in opt.param_groups:
        g["lr"] = lr
      key = core.step_key(state)
      losses = []
      for i in range(ACCUM):  # our step's micro-batch i: rows i, i + ACCUM, ...; its own mask key
        _, k_mask = jax.random.split(jax.random.fold_in(key, i))
        noise = np.asarray(masking.random_mask_from_key(k_mask, B // ACCUM, spec.num_patches))
        x = (batch[i::ACCUM].astype(np.float32) / 255.0 - mean) / std
        loss = peer(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), noise=torch.from_numpy(noise))[0]
        (loss / ACCUM).backward()
        losses.append(loss.item())
      opt.step()
      opt.zero_grad()
      theirs.append(float(np.mean(losses)))
      state, metrics = step_fn(state, rest, {"image": jnp.asarray(batch)})
      ours.append(float(metrics["loss"]))
      assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-5, abs=1e-9)
  assert len(ours) == steps == 35
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  assert ours[-1] < ours[0]  # it trained
