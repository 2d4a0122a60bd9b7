"""The command lines as a new user types them (issue 17): relative paths, a short message and exit
status 2 for each kind of config mistake (and nothing created), log.txt and the closing line, a
rerun of a finished run, exported files readable by everyone."""

import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from tests import downstream_runs
from tests import train_helpers as H
from tests.conftest import REPO


def _run(args, cwd, env=None, timeout=300, umask=None):
  cmd = [sys.executable, *args]
  if umask is not None:  # through the shell: a preexec_fn would fork this multithreaded process
    cmd = ["sh", "-c", f"umask {umask:03o} && exec {shlex.join(cmd)}"]
  out = subprocess.run(cmd, cwd=cwd, env={**H.env(), **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
  return out.returncode, out.stdout, out.stderr


MAE = "--config=configs/mae.py:smoke"

# (arguments, what the message must say): one per kind of mistake.
MISTAKES = {
    "typo": ([MAE, "--config.train.epochz=3"],
             ["no field 'train.epochz'", "did you mean train.epochs"]),
    "type": ([MAE, "--config.train.epochs=abc"],
             ["--config.train.epochs=abc", "invalid literal for int()"]),
    "file": (["--config=configs/mea.py:smoke"],
             ["no config file 'configs/mea.py'", "did you mean configs/mae.py", "configs/d2mae.py, "]),
    "arg": (["--config=configs/mae.py:smokey"],
            ["config argument 'smokey' is not known", "did you mean 'smoke'", "['demo', 'norm_pix', 'smoke', 'us', 'variant']"]),
    "value": ([MAE, "--config.train.base_lr=-1"], ["config.train.base_lr=-1.0: must be > 0"]),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_config_mistake_is_two_lines_and_exit_2(kind, tmp_path):
  args, says = MISTAKES[kind]
  rc, _, err = _run(["-m", "mae_jax.main", *args, "--workdir=runs/w"], cwd=REPO)
  # REPO is the cwd (configs/ paths as in the README); the workdir must not appear there.
  assert rc == 2, err
  lines = err.strip().splitlines()
  assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
  assert lines[0].startswith("mae_jax.main: error: "), err
  for text in says:
    assert text in err, (text, err)
  assert not os.path.exists(REPO / "runs" / "w")


def test_verbose_adds_the_traceback(tmp_path):
  args = MISTAKES["value"][0]
  for extra, env in (["--verbose"], {}), ([], {"MAE_JAX_VERBOSE": "1"}):
    rc, _, err = _run(["-m", "mae_jax.main", *args, f"--workdir={tmp_path / 'w'}", *extra], cwd=REPO, env=env)
    assert rc == 2 and "Traceback (most recent call last)" in err, err
    assert err.strip().splitlines()[-1] == "mae_jax.main: error: config.train.base_lr=-1.0: must be > 0"
  assert not os.path.exists(tmp_path / "w")


@pytest.fixture(scope="module")
def mae_pretrain(tmp_path_factory):
  return downstream_runs.mae_smoke_pretrain(tmp_path_factory)


def test_relative_paths_log_file_rerun_and_export(mae_pretrain, tmp_path):
  """A probe run and its export with relative paths (the export once failed: orbax wants absolute
  ones), log.txt with the closing line, a rerun that does nothing, files created 0644."""
  os.symlink(mae_pretrain, tmp_path / "pre")
  probe = [f"--config={REPO / 'configs' / 'linear_probe.py'}:smoke,init_from=pre", "--workdir=runs/lp",
           "--config.train.epochs=1", "--config.eval.n_boot=20"]
  rc, out, err = _run(["-m", "mae_jax.main", *probe], cwd=tmp_path)
  assert rc == 0, err[-3000:] + out[-3000:]
  wd = tmp_path / "runs" / "lp"
  last = out.strip().splitlines()[-1]
  assert re.search(rf"done: linear_probe finished at step 8; results in {re.escape(str(wd))}/results.md", last), last
  log_txt = (wd / "log.txt").read_text()
  assert log_txt.strip().splitlines()[-1] == last
  assert " trainable params" in log_txt and "first step compiled and ran in" in log_txt
  # The saved config does not depend on where it ran from.
  assert json.loads((wd / "config.json").read_text())["init_from"] == str(tmp_path / "pre")

  rc, out, err = _run(["-m", "mae_jax.main", *probe], cwd=tmp_path)
  assert rc == 0, err[-3000:]
  assert "already complete at step 8" in out.strip().splitlines()[-1], out[-2000:]
  assert (wd / "log.txt").read_text() == log_txt  # nothing ran; the log was not rewritten

  # A private umask would make the files 0600 without the export's chmod.
  rc, out, err = _run(["-m", "mae_jax.export", "--workdir=runs/lp", "--format=timm", "--out=out/lp.safetensors"],
                      cwd=tmp_path, umask=0o077)
  assert rc == 0, err[-3000:]
  written = sorted(os.listdir(tmp_path / "out"))
  assert "lp.safetensors" in written and len(written) >= 3, written
  for name in written:
    assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644, name


def test_smoke_run_console_is_quiet_without_tensorflow(tmp_path):
  """The README's smoke run with TensorFlow hidden (tests/no_tensorflow): it runs; the console has
  under 30 lines, every one ours (time, level, message: no progress bars, no library's raw prints)
  and none of the libraries' routine chatter; the parameter table is in log.txt; TensorBoard reads
  the loss curve back."""
  from tensorboard.backend.event_processing import event_accumulator

  from tests.test_dependencies import no_tensorflow_env
  wd = tmp_path / "w"
  rc, out, err = _run(["-m", "mae_jax.main", MAE, f"--workdir={wd}"], cwd=REPO, env=no_tensorflow_env(H.env()))
  assert rc == 0, err[-3000:] + out[-3000:]
  lines = (out + err).strip().splitlines()
  assert len(lines) < 30, "\n".join(lines)
  assert all(re.match(r"\d\d:\d\d:\d\d [IWE] ", line) for line in lines), "\n".join(lines)
  for chatter in ("fontManager", "Got images", "custom data configuration", "work unit", "Total: "):
    assert chatter not in out + err, chatter
  assert len([line for line in lines if " parameters: " in line]) == 1
  log_txt = (wd / "log.txt").read_text()
  assert "Total: 43,552" in log_txt and "| encoder/" in log_txt  # the micro MAE's table
  acc = event_accumulator.EventAccumulator(str(wd), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  loss = {e.step for e in acc.Tensors("loss")}
  assert {1, 10, 20, 30, 40, 50, 60} <= loss, sorted(loss)
  assert acc.Images("reconstruction"), acc.Tags()
