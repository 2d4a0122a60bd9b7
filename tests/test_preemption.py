"""Preemption and crashes never lose work: SIGTERM saves at the next step boundary and exits 0
(issue 7, acceptance 2); an exception in the loop still completes the checkpoint being written in
the background."""

import os
import signal
import sys
import textwrap

import jax
import numpy as np
import pytest

from mae_jax.train import core
from tests import train_helpers as H


@pytest.fixture(scope="module", autouse=True)
def _dataset():
  H.build_smoke_dataset()


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path):
  wd, log = tmp_path / "w", tmp_path / "run.log"
  # Far more steps than will run, and no periodic checkpoint: the only one is the preemption's.
  proc = H.start(H.cli(wd, *H.FAST, "--config.train.total_steps=100000",
                       "--config.train.checkpoint_every=100000"), log)
  try:
    H.wait_for(lambda: len(H.logged_steps(wd)) >= 3, proc, log, "three logged steps")
    signalled_after = max(H.logged_steps(wd))
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out = H.read(log)
  assert rc == 0, out
  assert "SIGTERM received" in out and "preempted: checkpoint at step" in out
  steps = H.committed_steps(wd)
  assert len(steps) == 1 and signalled_after <= steps[0] < 100000, (steps, signalled_after)
  # The run stopped right there: the last logged step is the checkpoint, and it did not "finish".
  assert max(H.logged_steps(wd)) == steps[0]
  assert not os.path.exists(wd / "train_done.json")
  step, params = core.restore_params(str(wd))
  assert step == steps[0]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


_CRASH = """
import sys
from absl import app
from mae_jax import main
from mae_jax.train import core

real_save, real_batch, saved = core.save_checkpoint, core.global_batch, []

def save(mngr, step, *args, **kwargs):
  real_save(mngr, step, *args, **kwargs)
  saved.append(step)
  print("SAVE_IN_FLIGHT", step, mngr.is_saving_in_progress(), flush=True)

def batch(local, mesh):
  if saved:  # the step right after the first checkpoint was handed to orbax
    raise RuntimeError("injected crash")
  return real_batch(local, mesh)

core.save_checkpoint, core.global_batch = save, batch
sys.argv = ["mae_jax.main"] + sys.argv[1:]
app.run(main.main)
"""


def test_exception_in_the_loop_still_commits_the_async_checkpoint(tmp_path):
  wd = tmp_path / "w"
  args = H.cli(wd, *H.FAST, "--config.train.total_steps=50", "--config.train.checkpoint_every=2")
  rc, out = H.run([sys.executable, "-c", textwrap.dedent(_CRASH), *args[3:]], tmp_path / "run.log")
  assert rc != 0 and "RuntimeError: injected crash" in out, out
  assert "SAVE_IN_FLIGHT 2" in out, out
  # The exception escaped while step 2 was being written; it is committed all the same.
  assert H.committed_steps(wd) == [2]
  assert not [n for n in os.listdir(wd / "checkpoints") if "tmp" in n]
  step, _ = core.restore_params(str(wd))
  assert step == 2
  assert H.logged_steps(wd) == [1, 2]
