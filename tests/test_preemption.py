"""Preemption and crashes never lose work: SIGTERM saves at the next step boundary and exits 0
(issue 7, acceptance 2), in pretraining, fine-tuning, linear probing and segmentation, and a
fine-tuning or segmentation run resumed from that checkpoint ends exactly as the uninterrupted run;
a SIGTERM during the set-up (dataset, compile) exits 0 without a checkpoint; an exception in the
loop still completes the checkpoint being written in the background."""

import json
import os
import re
import signal
import sys
import textwrap

import jax
import numpy as np
import pytest

from mae_jax import validate
from mae_jax.data import sources
from mae_jax.train import checkpoint
from tests import smoke_runs
from tests import train_helpers as H
from tests.conftest import REPO, load_config


@pytest.fixture(scope="module", autouse=True)
def _dataset():
  H.build_smoke_dataset()
  # Segmentation's smoke dataset is stored at 128 px: another build, done here once.
  sources.open_source(load_config("segment", "smoke").data, "train", task="segment")


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
  step, params = checkpoint.restore_params(str(wd))
  assert step == steps[0]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


_CRASH = """
import sys
from absl import app
from mae_jax import main
from mae_jax.train import checkpoint, sharding

real_save, real_batch, saved = checkpoint.save_checkpoint, sharding.global_batch, []

def save(mngr, step, *args, **kwargs):
  real_save(mngr, step, *args, **kwargs)
  saved.append(step)
  print("SAVE_IN_FLIGHT", step, mngr.is_saving_in_progress(), flush=True)

def batch(local, mesh):
  if saved:  # the step right after the first checkpoint was handed to orbax
    raise RuntimeError("injected crash")
  return real_batch(local, mesh)

checkpoint.save_checkpoint, sharding.global_batch = save, batch
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
  step, _ = checkpoint.restore_params(str(wd))
  assert step == 2
  assert H.logged_steps(wd) == [1, 2]


# --------------------------------------------------------------- a SIGTERM at a chosen moment

# The job sends itself SIGTERM at a chosen moment, so the test knows exactly when it came: argv[1] is
# 'setup' (while the job opens its first dataset split: before any step, before any compile), N
# (while it draws its N-th training batch, i.e. during step start + N) or 'never'.
_SIGTERM_AT = """
import os
import re
import signal
import sys
from absl import app
from mae_jax import main
from mae_jax.data import pipeline, sources

when = sys.argv.pop(1)

def sigterm_self():
  os.kill(os.getpid(), signal.SIGTERM)

if when == "setup":
  real_open = sources.open_source

  def open_source(*args, **kwargs):
    sigterm_self()
    return real_open(*args, **kwargs)

  sources.open_source = open_source
elif when != "never":
  real_iterator = pipeline.train_iterator

  def train_iterator(*args, **kwargs):
    def batches():
      for i, batch in enumerate(real_iterator(*args, **kwargs), 1):
        if i == int(when):
          sigterm_self()
        yield batch
    return batches()

  pipeline.train_iterator = train_iterator
sys.argv = ["mae_jax.main"] + sys.argv[1:]
app.run(main.main)
"""


def _run(args, log, when=None):
  """`python -m mae_jax.main ARGS`, with a SIGTERM at `when` (None: none)."""
  cmd = [sys.executable, "-c", textwrap.dedent(_SIGTERM_AT), str(when or "never"), *args]
  return H.run(cmd, log, timeout=240)


@pytest.fixture(scope="module")
def mae_pretrain(tmp_path_factory):
  return smoke_runs.smoke_workdir(smoke_runs.shared_root(tmp_path_factory), "mae")


# Two epochs (fine-tuning and probing 8 steps each, segmentation 16), every step logged, cheap CIs.
_DOWNSTREAM = {
    "finetune": ("finetune.py:smoke", ()),
    "linear_probe": ("linear_probe.py:smoke", ()),
    "segment": ("segment.py:smoke", ("--config.eval.overlay_images=0",)),
}


def _downstream_args(job, pre, wd):
  config, extra = _DOWNSTREAM[job]
  return [f"--config={REPO / 'configs' / config},init_from={pre}", f"--workdir={wd}",
          "--config.train.epochs=2", "--config.train.log_every=1", "--config.eval.n_boot=50", *extra]


def _trained_steps(log_text):
  """The steps a run logged ('12:30:42 I [3] ..., loss=0.91, ...'), in order."""
  return [int(n) for n in re.findall(r" I \[(\d+)\] .*\bloss=", log_text)]


@pytest.mark.parametrize("job", ["pretrain", "finetune", "segment"])
def test_sigterm_during_the_setup_exits_cleanly_without_a_checkpoint(job, mae_pretrain, tmp_path):
  wd, log = tmp_path / "w", tmp_path / "run.log"
  if job == "pretrain":
    args = H.cli(wd, *H.FAST)[3:]
  else:
    args = _downstream_args(job, mae_pretrain, wd)
  rc, out = _run(args, log, when="setup")
  # Without the early handler SIGTERM's default action kills the process: rc -15.
  assert rc == 0, out
  assert "SIGTERM received" in out and "preempted before the first step" in out, out
  assert _trained_steps(out) == [] and "first step compiled" not in out
  assert validate.checkpoint_steps(str(wd)) == [] and validate.checkpoint_steps(str(wd / "best")) == []
  assert not os.path.exists(wd / "train_done.json") and not os.path.exists(wd / "results.json")


def _params(workdir):
  return jax.tree.leaves(checkpoint.restore_params(str(workdir))[1])


# 256 smoke training images: 8 steps per epoch at batch 32 (classification), 16 at batch 16
# (segmentation); the SIGTERM comes mid-epoch 2, after the epoch-1 validation.
@pytest.mark.parametrize("job,per_epoch,stop", [("finetune", 8, 11), ("linear_probe", 8, 11),
                                                ("segment", 16, 20)])
def test_preempted_downstream_run_resumes_to_the_uninterrupted_result(job, per_epoch, stop, mae_pretrain,
                                                                      tmp_path):
  """The preemption checkpoint must carry the state (and the probe's BatchNorm statistics), the data
  position, the best parameters and the validation history."""
  ref, wd = tmp_path / "ref", tmp_path / "w"
  total = 2 * per_epoch
  rc, out = _run(_downstream_args(job, mae_pretrain, ref), tmp_path / "ref.log")
  assert rc == 0, out
  assert _trained_steps(out) == list(range(1, total + 1))

  # SIGTERM while batch stop + 1 is read: the run stops before dispatching step stop + 1.
  rc, out = _run(_downstream_args(job, mae_pretrain, wd), tmp_path / "first.log", when=stop + 1)
  assert rc == 0, out
  assert f"preempted: checkpoint at step {stop} saved" in out, out
  assert _trained_steps(out) == list(range(1, stop + 1))
  assert validate.checkpoint_steps(str(wd)) == [stop]
  # The epoch-1 best parameters are on disk too: segmentation writes them only every
  # `train.checkpoint_every` = 10 epochs, so there the preemption itself must have saved them.
  assert validate.checkpoint_steps(str(wd / "best")) == [per_epoch]
  assert not os.path.exists(wd / "results.json")

  rc, out = _run(_downstream_args(job, mae_pretrain, wd), tmp_path / "second.log")
  assert rc == 0, out
  assert f"resumed at step {stop}" in out and _trained_steps(out) == list(range(stop + 1, total + 1))
  # Bit for bit: the same final and best parameters, the same validation history and test metrics.
  for a, b in zip(_params(ref), _params(wd), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_params(ref / "best"), _params(wd / "best"), strict=True):
    np.testing.assert_array_equal(a, b)
  with open(ref / "results.json") as f:
    want = json.load(f)
  with open(wd / "results.json") as f:
    got = json.load(f)
  for key in ("test", "validation_history", "validation_best", "test_n"):
    assert got[key] == want[key], key
  assert len(got["validation_history"]) == 2
  p, q = np.load(ref / "predictions_test.npz"), np.load(wd / "predictions_test.npz")
  for k in p.files:
    np.testing.assert_array_equal(p[k], q[k])


# --------------------------------------------------------------- a SIGTERM during a step

# The SIGTERM comes from inside the jitted step whose state.step is argv[1] (a host callback), after
# a pause that leaves the loop time to queue the next step if it does not wait: the run must stop
# once that step has finished, without running another.
_SIGTERM_IN_STEP = """
import os
import signal
import sys
import time
import jax
from absl import app
from mae_jax import main
from mae_jax.train import finetune, pretrain

at = int(sys.argv.pop(1))

def sigterm_at(step):
  if int(step) == at:
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)

def signalling(step_fn):
  def wrapped(state, *args):
    jax.debug.callback(sigterm_at, state.step)
    return step_fn(state, *args)
  return wrapped

real_pretrain, real_finetune = pretrain.make_train_step, finetune.make_steps
pretrain.make_train_step = lambda *a, **k: signalling(real_pretrain(*a, **k))

def make_steps(*a, **k):
  train_step, eval_step = real_finetune(*a, **k)
  return signalling(train_step), eval_step

finetune.make_steps = make_steps
sys.argv = ["mae_jax.main"] + sys.argv[1:]
app.run(main.main)
"""


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_sigterm_during_a_step_stops_after_that_step(job, mae_pretrain, tmp_path):
  at = 4  # the signal comes during step 5 (state.step 4 -> 5)
  wd, log = tmp_path / "w", tmp_path / "run.log"
  if job == "pretrain":
    args = H.cli(wd, "--config.train.total_steps=1000", "--config.train.checkpoint_every=1000",
                 "--config.train.image_every=0")[3:]
  else:
    args = [f"--config={REPO / 'configs' / 'finetune.py'}:smoke,init_from={mae_pretrain}", f"--workdir={wd}",
            "--config.train.epochs=3"]
  cmd = [sys.executable, "-c", textwrap.dedent(_SIGTERM_IN_STEP), str(at), *args]
  rc, out = H.run(cmd, log, timeout=240)
  assert rc == 0, out
  assert "SIGTERM received" in out and f"preempted: checkpoint at step {at + 1} saved" in out, out
  # Steps run after the signal: the one it interrupted, none queued behind it.
  assert validate.checkpoint_steps(str(wd)) == [at + 1], out
