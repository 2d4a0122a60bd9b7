"""Exact resume: a run SIGKILLed after a checkpoint and restarted reproduces the uninterrupted run's
per-step losses and final parameters bit for bit (issue 7, acceptance 1)."""

import jax
import numpy as np
import pytest

from mae_jax.train import checkpoint, loop
from tests import train_helpers as H

N, EVERY = 40, 5
ARGS = (*H.FAST, f"--config.train.total_steps={N}", f"--config.train.checkpoint_every={EVERY}",
        "--config.train.keep_checkpoints=2")


@pytest.fixture(scope="module", autouse=True)
def _dataset():
  H.build_smoke_dataset()


def _by_step(records):
  return {r["step"]: r for r in records}


def test_sigkill_and_restart_is_bit_exact(tmp_path):
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  # The uninterrupted reference and the run to be killed train side by side.
  ref = H.start(H.cli(ref_dir, *ARGS), tmp_path / "ref.log")
  victim = H.start(H.cli(run_dir, *ARGS), tmp_path / "run1.log")
  try:
    H.wait_for(lambda: H.committed_steps(run_dir), victim, tmp_path / "run1.log", "a committed checkpoint")
    victim.kill()  # SIGKILL: no handler, no finally, no flush
    victim.wait()
    assert ref.wait(timeout=300) == 0, H.read(tmp_path / "ref.log")
  finally:
    for p in (ref, victim):
      if p.poll() is None:
        p.kill()
        p.wait()
  assert victim.returncode == -9
  killed_at = max(H.logged_steps(run_dir), default=0)
  resumed_from = max(H.committed_steps(run_dir))
  assert resumed_from < N, "the victim finished before it was killed: make N larger"
  before_kill = loop.read_metrics(str(run_dir))
  # What a save killed half-way leaves behind: never restored, removed on restart.
  partial = run_dir / "checkpoints" / f"{N - 1}.orbax-checkpoint-tmp-1700000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 64)

  rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "run2.log")
  assert rc == 0, out
  assert f"resumed from the checkpoint at step {resumed_from}" in out
  assert not partial.exists()

  ref_m = _by_step(loop.read_metrics(str(ref_dir)))
  run_records = loop.read_metrics(str(run_dir))
  # Lines the killed run wrote past its checkpoint were moved aside on resume (to
  # metrics.discarded.jsonl, never lost): metrics.jsonl has one line per step.
  assert [r["step"] for r in run_records] == list(range(1, N + 1))
  if killed_at > resumed_from:
    discarded = (run_dir / "metrics.discarded.jsonl").read_text()
    assert f'"step": {killed_at}' in discarded
  run_m = _by_step(run_records)
  after = range(resumed_from + 1, N + 1)
  assert len(after) > 0
  for s in after:
    for key in ("loss", "grad_norm", "lr", "mask_fraction"):
      assert run_m[s][key] == ref_m[s][key], (s, key, run_m[s][key], ref_m[s][key])
  # The killed run itself (including steps it took past the checkpoint) matched the reference too.
  assert killed_at >= resumed_from
  for r in before_kill:
    assert r["loss"] == ref_m[r["step"]]["loss"], r["step"]

  ref_step, ref_params = checkpoint.restore_params(str(ref_dir))
  run_step, run_params = checkpoint.restore_params(str(run_dir))
  assert ref_step == run_step == N
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(run_params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
