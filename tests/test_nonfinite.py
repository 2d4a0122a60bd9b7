"""Non-finite steps and divergence (issue 7, acceptance 3; issue 27, item 4): a NaN batch is skipped
with the parameters and optimizer state unchanged and the counter incremented; K consecutive ones, a
non-finite final step, or a loss far above its start stop the run (`loop.RunFailed`, exit 1) with a
message naming the last good checkpoint, which restores; a failed run is never "done"."""

import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mae_jax.train import checkpoint, loop, pretrain, sharding
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
  real_batch, real_save = sharding.global_batch, loop._Guard.save

  def nan_batch(local, mesh):
    draws.append(None)
    image = np.asarray(local["image"], np.float32)  # a float batch can carry the NaN into the step
    if len(draws) in SINGLE | STREAK:
      image[0] = np.nan
    return real_batch({**local, "image": image}, mesh)

  def spy_save(self, step, state, **kw):  # every step's state (checkpoint_every=1), saved or skipped
    states[step] = _host(state)
    return real_save(self, step, state, **kw)

  mp.setattr(sharding, "global_batch", nan_batch)
  mp.setattr(loop._Guard, "save", spy_save)
  try:
    with pytest.raises(loop.RunFailed) as err:
      pretrain.train(config, wd)
  finally:
    mp.undo()
  return wd, states, {r["step"]: r for r in loop.read_metrics(wd)}, str(err.value)


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
  assert restored["data"]["next_batch"] == 5 and restored["data"]["first_loss"] == metrics[1]["loss"]
  assert _equal(state["params"], states[5].params)
  assert _equal(state["params"], states[7].params)  # the streak never touched the parameters


# ------------------------------------------------------------------------- a failed run is not done


def _guard(total=10, max_bad=3, first_loss=None):
  saved = []
  job = loop.Job(total=total, start=0, carry=None, batch=None, step=None, checkpoint_due=None,
                 save=lambda step, carry, data, force: saved.append((step, data, force)),
                 latest_checkpoint=lambda: (4, "/w/checkpoints"), close=None, first_loss=first_loss)
  return loop._Guard(job, max_bad), saved


def _m(loss, streak=0):
  return {"loss": np.float32(loss), "bad_streak": np.int32(streak)}


def test_a_non_finite_final_step_fails_the_run():
  guard, _ = _guard(total=10)
  guard.check(9, _m(np.nan, 1))  # one bad step before the end: a warning only
  with pytest.raises(loop.RunFailed, match=r"final step 10 was not finite \(2 in a row\).*last good "
                                           r"checkpoint is step 4 in /w/checkpoints"):
    guard.check(10, _m(np.nan, 2))
  assert loop.RunFailed.exit_code == 1


def test_a_loss_100x_its_first_value_fails_the_run():
  guard, saved = _guard()
  guard.check(1, _m(0.5))
  guard.check(2, _m(50.0))  # 100x exactly: still allowed
  with pytest.raises(loop.RunFailed, match=r"loss 50.01 at step 3 is more than 100x the run's first "
                                           r"loss \(0.5\)"):
    guard.check(3, _m(50.01))
  guard.save(3, None, preempted=False)
  assert saved == [(3, {"first_loss": 0.5}, False)]  # kept with the checkpoint for a resumed run


def test_the_first_loss_survives_a_resume():
  guard, _ = _guard(first_loss=0.5)
  with pytest.raises(loop.RunFailed, match="100x"):
    guard.check(7, _m(60.0))


def test_no_periodic_checkpoint_inside_a_bad_streak():
  guard, saved = _guard()
  guard.check(5, _m(np.inf, 1))
  guard.save(5, None, preempted=False)
  guard.save(5, None, preempted=True)  # a preemption's is written: skipped steps change nothing
  assert saved == [(5, {"first_loss": None}, True)]


def test_a_diverging_run_exits_non_zero_and_is_never_complete(tmp_path):
  """issue 27, item 4: `base_lr=1e9, total_steps=11` was "done" with max |param| 1.6e7, and its rerun
  "already complete"."""
  H.build_smoke_dataset()
  wd = tmp_path / "w"
  args = H.cli(wd, "--config.train.base_lr=1e9", "--config.train.total_steps=11", *H.FAST)
  for attempt in ("first", "rerun"):
    rc, out = H.run(args, tmp_path / f"{attempt}.log")
    assert rc == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("mae_jax: ") and ("not finite" in last or "100x" in last), out[-3000:]
    assert "done:" not in out and "already complete" not in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not (wd / "train_done.json").exists()
  # The newest checkpoint (if any) holds finite parameters with a finite loss's step behind it.
  for step in H.committed_steps(wd):
    _, params = checkpoint.restore_params(str(wd), step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
