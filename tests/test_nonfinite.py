"""Non-finite steps (issue 7, acceptance 3): a NaN batch is skipped with the parameters and optimizer
state unchanged and the counter incremented; K consecutive ones stop the run with a message naming
the last good checkpoint, which restores."""

import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mae_jax.train import core, pretrain
from tests import train_helpers as H

SINGLE, STREAK, K = {3}, {6, 7, 8}, 3


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
  """One in-process run: a NaN image in the batches of step 3 and of steps 6, 7, 8; K = 3."""
  H.build_smoke_dataset()
  wd = str(tmp_path_factory.mktemp("nan") / "w")
  config = H.smoke_config(total_steps=20, checkpoint_every=1, keep_checkpoints=50, max_bad_steps=K)
  mp = pytest.MonkeyPatch()
  draws, states = [], {}
  real_batch, real_save = core.global_batch, pretrain._save

  def nan_batch(local, mesh):
    draws.append(None)
    image = np.asarray(local["image"], np.float32)  # a float batch can carry the NaN into the step
    if len(draws) in SINGLE | STREAK:
      image[0] = np.nan
    return real_batch({**local, "image": image}, mesh)

  def spy_save(mngr, step, state, **kw):  # sees the state of every step (checkpoint_every=1)
    states[step] = _host(state)
    return real_save(mngr, step, state, **kw)

  mp.setattr(core, "global_batch", nan_batch)
  mp.setattr(pretrain, "_save", spy_save)
  try:
    with pytest.raises(pretrain.NonFiniteError) as err:
      pretrain.train(config, wd)
  finally:
    mp.undo()
  return wd, states, {r["step"]: r for r in pretrain.read_metrics(wd)}, str(err.value)


def test_a_nan_step_is_skipped(nan_run):
  _, states, metrics, _ = nan_run
  m = metrics[3]
  assert math.isnan(m["loss"]) and m["finite"] == 0 and m["skipped_total"] == 1 and m["bad_streak"] == 1
  assert metrics[2]["skipped_total"] == 0 and metrics[2]["finite"] == 1
  # Parameters and optimizer state (moments and count) are exactly those after step 2.
  assert _equal(states[3].params, states[2].params)
  assert _equal(states[3].opt_state, states[2].opt_state)
  assert int(states[3].step) == 3 and int(states[3].skipped) == 1 and int(states[3].bad_steps) == 1
  # The next good step trains again, resets the streak, and keeps the total.
  assert metrics[4]["finite"] == 1 and metrics[4]["bad_streak"] == 0 and metrics[4]["skipped_total"] == 1
  assert not _equal(states[4].params, states[3].params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[4].params))


def test_k_consecutive_nans_stop_the_run_with_a_good_checkpoint(nan_run):
  wd, states, metrics, message = nan_run
  assert "3 consecutive non-finite steps (train.max_bad_steps=3) at step 8" in message
  assert "last good checkpoint is step 5" in message
  assert max(metrics) == 8  # stopped as soon as the third bad step was read
  assert [metrics[s]["bad_streak"] for s in (6, 7, 8)] == [1, 2, 3]
  assert metrics[8]["skipped_total"] == 4
  # No checkpoint is written inside a bad streak (step 3 was one too), so the newest is good.
  assert H.committed_steps(wd) == [1, 2, 4, 5]
  mngr = ocp.CheckpointManager(f"{wd}/checkpoints", item_names=("state", "data"))
  try:
    restored = mngr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        data=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  state = restored["state"]
  assert int(state["step"]) == 5 and int(state["bad_steps"]) == 0 and int(state["skipped"]) == 1
  assert restored["data"] == {"next_batch": 5}
  assert _equal(state["params"], states[5].params)
  assert _equal(state["params"], states[8].params)  # the streak never touched the parameters
