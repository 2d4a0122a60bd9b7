"""The train state every job shares and the bookkeeping around it: one optimizer update that skips a
non-finite step, the per-step key, and a workdir's config (mesh and shardings: `sharding.py`;
optimizers and schedules: `optim.py`; checkpoints: `checkpoint.py`; the loop: `loop.py`)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mae_jax.train import checkpoint


# ---------------------------------------------------------------------------------- train state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), so checkpoints need no typed-key support
  bad_steps: jax.Array  # consecutive non-finite steps
  skipped: jax.Array  # total non-finite steps skipped


def split_model(model):
  """(graphdef, trainable params, everything else) — the frozen position tables go to the rest."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def init_state(params, tx, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    bad_steps=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))


def step_key(state: TrainState, salt: int = 0):
  """A key that depends only on the seed and the step: a given step always draws the same masks."""
  key = jax.random.wrap_key_data(state.rng)
  return jax.random.fold_in(jax.random.fold_in(key, state.step), salt)


def apply_if_finite(state: TrainState, grads, loss, tx, *, branch: bool | None = None):
  """One optimizer update, skipped (params and moments unchanged) when the loss or gradient is not
  finite: a single bad batch must not poison a week-long run.

  `branch` picks how the skip is expressed. On CPU a `lax.cond` around the update is faster than
  selecting every leaf with `where(ok, new, old)`: the selects read the old moments after the
  donated buffers are overwritten, so XLA:CPU inserts a copy of every moment (docs/benchmarks.md).
  On GPU a conditional reads its predicate back to the host, a sync per step, so accelerators keep
  the selects (a few extra passes over memory). None = by backend."""
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if branch is None:
    branch = jax.default_backend() == "cpu"

  def update(params, opt_state, grads):
    updates, new_opt = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt

  if branch:
    params, opt_state = jax.lax.cond(
        ok, lambda p, o: update(p, o, grads), lambda p, o: (p, o), state.params, state.opt_state)
  else:
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    new_params, new_opt = update(state.params, state.opt_state, safe_grads)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    params, opt_state = pick(new_params, state.params), pick(new_opt, state.opt_state)
  new_state = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      rng=state.rng,
      bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
      skipped=state.skipped + (~ok).astype(jnp.int32),
  )
  return new_state, grad_norm, ok


# ------------------------------------------------------------------------------------- bookkeeping


def save_config(config, workdir: str) -> None:
  """config.json, written once by the run that creates the workdir; later runs are checked
  against it (mae_jax/workdir.py)."""
  from mae_jax import workdir as workdir_identity
  workdir_identity.claim(config, workdir)


def load_config(workdir: str):
  import ml_collections
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir!r} holds no config.json: is it a mae_jax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_pretrained(workdir: str, step: int | None = None):
  """(config, model, step) of a pretraining workdir: the config JSON saved there is the whole truth
  about the run (recipe, blur, σ levels, token), so transfer jobs never ask for it again."""
  from mae_jax import models  # local import: models import nothing from train
  config = load_config(workdir)
  step, params = checkpoint.restore_params(workdir, step)
  model = models.build_pretrain_model(config.model, seed=config.seed)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))  # errors on a missing key
  nnx.update(model, state)
  return config, model, int(step)

