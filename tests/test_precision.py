"""bfloat16 compute (what `model.dtype='auto'` picks on GPU/TPU), run here on CPU: each recipe's real
train step runs, its loss stays close to the float32 step's on the same batch and key, the update
is finite, and parameters and Adam moments stay float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import models
from mae_jax.train import core, optim, pretrain
from tests.conftest import load_config

MEAN, STD = 0.2, 0.2


def _one_step(recipe: str, dtype: str, images):
  """(initial params, state after one step, metrics)."""
  config = load_config(recipe, "smoke")
  config.model.dtype = dtype
  config.train.grad_accum = 1
  model = models.build_pretrain_model(config.model, seed=0)
  graphdef, params, rest = core.split_model(model)
  schedule = optim.warmup_cosine(1e-3, 0, 10)  # no warm-up: the first step moves the parameters
  tx = optim.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.05)
  step = jax.jit(pretrain.make_train_step(config, graphdef, tx, schedule, MEAN, STD))
  init = jax.tree.map(np.asarray, params)
  state, metrics = step(core.init_state(params, tx, seed=0), rest, {"image": images})
  return init, state, metrics


@pytest.mark.parametrize("recipe", ["mae", "d2mae", "usfm"])
def test_bfloat16_step_matches_float32_and_keeps_float32_state(recipe):
  size = load_config(recipe, "smoke").model.image_size
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, size, size, 1), dtype=np.uint8))
  p0, s32, m32 = _one_step(recipe, "float32", images)
  _, s16, m16 = _one_step(recipe, "bfloat16", images)
  assert bool(m16["finite"]) and np.isfinite(float(m16["grad_norm"]))
  # bfloat16 keeps 8 bits of mantissa: ~1e-3 relative on the loss here (3e-4 measured).
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=1e-2)
  for leaf in jax.tree.leaves((s16.params, s16.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  # Adam's first step moves every parameter by ≈ lr·sign(g): the bfloat16 gradient must point the
  # same way as the float32 one for nearly all of them.
  u32 = np.concatenate([(np.asarray(a) - b).ravel() for a, b in zip(jax.tree.leaves(s32.params), jax.tree.leaves(p0))])
  u16 = np.concatenate([(np.asarray(a) - b).ravel() for a, b in zip(jax.tree.leaves(s16.params), jax.tree.leaves(p0))])
  moved = np.abs(u32) > 1e-4
  assert moved.mean() > 0.5
  assert (np.sign(u16[moved]) == np.sign(u32[moved])).mean() > 0.9
