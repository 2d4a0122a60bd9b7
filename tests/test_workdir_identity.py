"""A workdir has one identity (issue 27, items 1 and 2): config.json is written once; a run of
another config, a job writing into its own init_from (or a workdir that init_from came from) and an
init_from holding the wrong job all stop before anything is written. The expected fields and
messages are written out by hand here, not derived from mae_jax/workdir.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mae_jax import main as cli_main
from mae_jax import workdir as identity
from mae_jax.train import core
from tests import train_helpers as H
from tests.conftest import REPO, load_config


def _workdir_of(config, path) -> str:
  """A workdir as a finished run of `config` leaves it, as far as identity goes: its config.json."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return str(path)


def _snapshot(path) -> dict:
  return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_differences_name_result_fields_and_ignore_the_resumable_ones():
  saved = {"recipe": "mae", "seed": 0, "model": {"mask_ratio": 0.75, "variant": "tiny"},
           "train": {"total_steps": 60, "log_every": 10, "checkpoint_every": 30, "base_lr": 1e-3},
           "mesh": {"fsdp": 1}}
  current = {"recipe": "deblur", "seed": 0, "model": {"mask_ratio": 0.75, "variant": "tiny"},
             "train": {"total_steps": 120, "log_every": 1, "checkpoint_every": 5, "base_lr": 2e-3},
             "mesh": {"fsdp": 2}}
  assert identity.differences(saved, current) == ["recipe", "train.base_lr"]
  assert identity.differences(saved, saved) == []
  # A field only one side has differs too (a config of another job, or of an older code version).
  assert identity.differences(saved, {**saved, "init_from": "/x"}) == ["init_from"]


def test_claim_writes_config_json_once_and_never_rewrites_it(tmp_path):
  config = H.smoke_config(total_steps=60)
  core.save_config(config, str(tmp_path))
  first = (tmp_path / "config.json").read_bytes()
  assert json.loads(first)["train"]["total_steps"] == 60
  longer = H.smoke_config(total_steps=90)  # extending the run is a resume: allowed, not recorded
  longer.train.checkpoint_every = 7
  core.save_config(longer, str(tmp_path))
  assert (tmp_path / "config.json").read_bytes() == first
  other = H.smoke_config(total_steps=60)
  other.recipe = "deblur"
  with pytest.raises(identity.IdentityMismatch) as e:
    core.save_config(other, str(tmp_path))
  assert "recipe (\"mae\" there, \"deblur\" now)" in str(e.value)
  assert (tmp_path / "config.json").read_bytes() == first
  assert sorted(os.listdir(tmp_path)) == ["config.json"]  # no temporary file left


def test_a_different_recipe_in_a_used_workdir_stops_before_touching_it(tmp_path):
  """Was (issue 27.1): `deblur_mae` in a finished MAE workdir rewrote config.json, exit 0, zero
  steps trained, the workdir then claiming recipe=deblur."""
  wd = _workdir_of(H.smoke_config(total_steps=60), tmp_path / "mae")
  with open(os.path.join(wd, "train_done.json"), "w") as f:
    json.dump({"step": 60}, f)
  before = _snapshot(wd)
  other = load_config("deblur_mae", "smoke")
  with pytest.raises(identity.IdentityMismatch) as e:
    cli_main.run(other, wd)
  text = str(e.value)
  assert text.startswith(f"{wd} holds a run of another config: it differs in ")
  assert "recipe (\"mae\" there, \"deblur\" now)" in text
  assert "Use a new --workdir" in text and "train.total_steps" in text.splitlines()[1]
  assert len(text.splitlines()) == 2
  assert e.value.exit_code == 2
  assert _snapshot(wd) == before  # not even log.txt or .lock


def test_a_longer_run_is_still_a_resume(tmp_path):
  wd = _workdir_of(H.smoke_config(total_steps=60), tmp_path / "mae")
  identity.check(H.smoke_config(total_steps=200, checkpoint_every=50, log_every=5), wd)  # no error


def _finetune(init_from: str, **extra):
  c = load_config("finetune", f"smoke,init_from={init_from}")
  for k, v in extra.items():
    c[k] = v
  return c


def test_a_job_may_not_write_into_its_own_init_from_or_where_it_came_from(tmp_path):
  """Was (issue 27.2): a fine-tune whose --workdir was its init_from replaced the pretraining
  config.json; every later job from it failed."""
  pre = _workdir_of(H.smoke_config(), tmp_path / "pre")
  before = _snapshot(pre)
  with pytest.raises(identity.WrongInitFrom, match="is this job's own --workdir"):
    cli_main.run(_finetune(pre), pre, checked=True)
  with pytest.raises(identity.WrongInitFrom, match="lies inside this job's --workdir"):
    identity.check(_finetune(pre), str(tmp_path))
  # A fine-tune from `ft` (itself from `pre`) writing into `pre`: an ancestor of its init_from.
  ft = _workdir_of(_finetune(pre), tmp_path / "ft")
  with pytest.raises(identity.WrongInitFrom, match=f"comes from {pre}, which is this job's"):
    identity.check(_finetune(ft), pre)
  assert _snapshot(pre) == before
  identity.check(_finetune(pre), str(tmp_path / "elsewhere"))  # the normal case passes


def test_rerunning_a_finetune_with_another_init_from_is_refused(tmp_path):
  """Was (issue 27.2): it resumed the old run and wrote its test numbers under the new init_from."""
  a = _workdir_of(H.smoke_config(), tmp_path / "a")
  other = H.smoke_config()
  other.seed = 1
  b = _workdir_of(other, tmp_path / "b")
  ft = _workdir_of(_finetune(a), tmp_path / "ft")
  with pytest.raises(identity.IdentityMismatch, match=r"init_from \(.*/a\" there, .*/b\" now\)"):
    identity.check(_finetune(b), ft)


def test_init_from_a_finetune_workdir_names_the_job_it_holds(tmp_path):
  """Was (issue 27.6): a 65-line traceback ending in KeyError: 'variant'."""
  pre = _workdir_of(H.smoke_config(), tmp_path / "pre")
  ft = _workdir_of(_finetune(pre), tmp_path / "ft")
  os.makedirs(os.path.join(ft, "checkpoints", "4"))
  with pytest.raises(ValueError) as e:
    cli_main.check(_finetune(ft))
  assert str(e.value) == (f"config.init_from={ft!r}: holds a 'finetune' job, not a pretraining run: "
                          "set it to the pretraining workdir that job started from")


def test_command_line_exit_2_with_two_lines_and_nothing_written(tmp_path):
  wd = _workdir_of(H.smoke_config(total_steps=60), tmp_path / "mae")
  before = _snapshot(wd)
  r = subprocess.run([sys.executable, "-m", "mae_jax.main", f"--config={REPO / 'configs' / 'mae.py'}:smoke",
                      f"--workdir={wd}", "--config.seed=3"], capture_output=True, text=True, env=H.env(),
                     timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.splitlines() == [
      f"mae_jax: {wd} holds a run of another config: it differs in seed (0 there, 3 now).",
      f"  Use a new --workdir for this config, or rerun with the workdir's own config "
      f"({wd}/config.json); a resume may change only train.total_steps, train.epochs, "
      "train.log_every, train.log_every_secs, train.image_every, train.checkpoint_every, "
      "train.keep_checkpoints, train.profile_steps, mesh.*, data.data_dir"], r.stderr
  assert _snapshot(wd) == before


def test_an_unreadable_config_json_stops_with_one_line(tmp_path):
  (tmp_path / "config.json").write_text('{"recipe": "ma')  # cut short
  with pytest.raises(identity.IdentityMismatch, match=r"config.json cannot be read \(.*\): restore it, or use a new --workdir"):
    identity.check(H.smoke_config(), str(tmp_path))


def test_a_raised_total_steps_trains_the_extra_steps_and_a_finished_rerun_is_complete(tmp_path):
  """config.json keeps the first run's train.total_steps; a rerun with a larger one must train up
  to it (not stop at the old total, not call itself complete), and a rerun of that longer run is
  "already complete" at its own last step."""
  from mae_jax.train import loop
  H.build_smoke_dataset()
  wd = tmp_path / "w"
  args = (*H.FAST, "--config.train.checkpoint_every=2")
  rc, out = H.run(H.cli(wd, *args, "--config.train.total_steps=4"), tmp_path / "run1.log")
  assert rc == 0 and "done: pretrain finished at step 4" in out, out
  rc, out = H.run(H.cli(wd, *args, "--config.train.total_steps=6"), tmp_path / "run2.log")
  assert rc == 0 and "resumed from the checkpoint at step 4" in out, out
  assert "done: pretrain finished at step 6" in out, out
  assert [r["step"] for r in loop.read_metrics(str(wd))] == list(range(1, 7))
  assert json.loads((wd / "config.json").read_text())["train"]["total_steps"] == 4  # the identity
  assert json.loads((wd / "train_done.json").read_text())["step"] == 6
  rc, out = H.run(H.cli(wd, *args, "--config.train.total_steps=6"), tmp_path / "run3.log")
  assert rc == 0 and "already complete at step 6" in out, out
  assert [r["step"] for r in loop.read_metrics(str(wd))] == list(range(1, 7))
  # The first length again is another run, not "complete" at step 6 under a 4-step config.
  assert cli_main.completed_step(H.smoke_config(total_steps=4, checkpoint_every=2), str(wd)) is None
