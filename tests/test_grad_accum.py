"""Gradient accumulation: the automatic micro-batch count, and that an accumulated step averages
the micro-batch gradients (checked against a hand-made two-micro-batch mean)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mae_jax import models
from mae_jax.train import core, pretrain
from tests.conftest import load_config


def _t(batch, accum=0, micro=32):
  return ml_collections.ConfigDict(dict(batch_size=batch, grad_accum=accum, cpu_micro_batch=micro))


@pytest.mark.parametrize("batch,devices,platform,expected", [
    (1024, 1, "cpu", 32), (1024, 8, "cpu", 4), (32, 1, "cpu", 1), (96, 1, "cpu", 3),
    (100, 1, "cpu", 4),  # 100 rows: 4 micro-batches of 25 (3 of 33.3 would not divide)
    (1024, 1, "gpu", 1), (1024, 1, "tpu", 1)])
def test_automatic_micro_batches(batch, devices, platform, expected):
  assert pretrain.grad_accum_steps(_t(batch), devices, platform) == expected


def test_explicit_value_wins():
  assert pretrain.grad_accum_steps(_t(1024, accum=2), 1, "cpu") == 2


def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients():
  config = load_config("mae", "smoke")
  config.train.grad_accum = 2
  model = models.build_pretrain_model(config.model, seed=0)
  graphdef, params, rest = core.split_model(model)
  seen = []

  class Recorder:  # an optimizer that records the gradient it is given and changes nothing
    def init(self, p):
      return ()

    def update(self, g, s, p=None):
      seen.append(g)
      return jax.tree.map(jnp.zeros_like, g), s

  step = pretrain.make_train_step(config, graphdef, Recorder(), lambda s: 0.0, 0.5, 0.25)
  state = core.init_state(params, Recorder(), 0)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 1)), jnp.uint8)
  new_state, metrics = step(state, rest, {"image": images})
  loss_fn = pretrain.make_loss_fn(config, graphdef, 0.5, 0.25)
  key = core.step_key(state)
  parts = [jax.value_and_grad(loss_fn, has_aux=True)(params, rest, images[i::2], jax.random.fold_in(key, i))
           for i in range(2)]
  expected_loss = (parts[0][0][0] + parts[1][0][0]) / 2
  expected = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=1e-5)
  for a, b in zip(jax.tree.leaves(seen[-1]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert int(new_state.step) == 1
