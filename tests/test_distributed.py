"""Multi-process training on one CPU machine, through the real CLI and launch/local.sh.

Two processes with 2 CPU devices each (JAX's gloo collectives over loopback) must train exactly
like one process with 4 devices on the same global batch, and a checkpoint written by either must
resume in the other. The 2-process command is the one launch/README.md shows, read from there, with
only the run length and the tiny data set appended. Also: the launch scripts parse (bash -n,
shellcheck when installed), the GPU flags they apply exist in the pinned jaxlib, and the cluster
detection of mae_jax.distributed.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mae_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
README = LAUNCH / "README.md"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
TOL = 1e-6

# The run length and a tiny built-in data set: everything else is the README command.
TINY = ["--config.data.num_train=64", "--config.data.num_validation=8", "--config.data.num_test=8",
        "--config.data.native_size=32", "--config.train.batch_size=16", "--config.train.log_every=1",
        "--config.train.image_every=0", "--config.train.checkpoint_every=3"]
STEPS, RESUME = 5, 3  # 5 steps (checkpoints at 3 and 5); the cross-restore resumes at 3


def readme_local_command() -> list[str]:
  """The command on the line after the marker comment in launch/README.md."""
  text = README.read_text()
  m = re.search(r"<!-- tests/test_distributed.py runs the command[^>]*-->\s*```[^\n]*\n([^\n]+)\n", text)
  assert m, "launch/README.md lost the tested local.sh command"
  return shlex.split(m.group(1))


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_processes():
  """A failing assertion must not leave training processes behind on a shared machine."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    proc.log.close()


def _popen(cmd, workdir, env) -> subprocess.Popen:
  log = open(f"{workdir}.log", "w")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)  # its own process group, for the cleanup
  proc.log = log
  _STARTED.append(proc)
  return proc


def _env(tmp_path, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "MAE_JAX_COORDINATOR", "MAE_JAX_NUM_PROCESSES", "MAE_JAX_PROCESS_ID",
                      "MAE_JAX_DISTRIBUTED")}
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, TMPDIR=str(tmp_path),
             PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
             # The 1-process and 2-process programs compile once each and are reused on resume.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update(extra)
  return env


def start_two_processes(tmp_path, workdir, data_dir, steps):
  """The README command (2 processes x 2 CPU devices), pointed at `workdir`."""
  cmd = [a for a in readme_local_command() if not a.startswith("--workdir=")]
  cmd += [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.train.total_steps={steps}", *TINY]
  return _popen(["bash", *cmd], workdir, _env(tmp_path))


def start_one_process(tmp_path, workdir, data_dir, steps, devices=4):
  """The same program as one plain process with `devices` CPU devices."""
  config = next(a for a in readme_local_command() if a.startswith("--config="))
  cmd = [sys.executable, "-m", "mae_jax.main", config, f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", f"--config.train.total_steps={steps}", *TINY]
  env = _env(tmp_path, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return _popen(cmd, workdir, env)


def finish(proc, workdir, timeout=600) -> str:
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  log = pathlib.Path(f"{workdir}.log").read_text()
  others = "".join(pathlib.Path(p).read_text()[-3000:] for p in
                   glob.glob(str(pathlib.Path(workdir).parent / "mae_jax_local.*" / "process_*.log")))
  assert proc.returncode == 0, f"exit {proc.returncode}\n{log[-6000:]}\n--- other processes ---\n{others}"
  return log


def losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # a line being written
        continue
      out[r["step"]] = r["loss"]
  return out


def assert_same(a: dict, b: dict, steps):
  for s in steps:
    assert abs(a[s] - b[s]) <= TOL, f"step {s}: {a[s]!r} vs {b[s]!r} (all: {a} vs {b})"


def resume_from(src, dst, step):
  """A copy of workdir `src` that has only the checkpoints up to `step` (as if stopped there)."""
  shutil.copytree(src, dst)
  for ckpt in (dst / "checkpoints").iterdir():
    if ckpt.name.isdigit() and int(ckpt.name) > step:
      shutil.rmtree(ckpt)
  for marker in ("train_done.json", "completed.json"):  # a run stopped there never finished
    (dst / marker).unlink(missing_ok=True)


def test_two_processes_train_like_one_and_checkpoints_cross(tmp_path):
  a, b = tmp_path / "one", tmp_path / "two"
  # Each run builds its own copy of the (deterministic) data: the 2-process run exercises the
  # build-once-then-read path of a data_dir shared by its processes.
  pa = start_one_process(tmp_path, a, tmp_path / "data_a", steps=STEPS)
  pb = start_two_processes(tmp_path, b, tmp_path / "data_b", steps=STEPS)
  log_a, log_b = finish(pa, a), finish(pb, b)
  assert "devices=4 processes=1" in log_a
  assert "process 0 of 2, 2 local / 4 global devices" in log_b and "devices=4 processes=2" in log_b
  la, lb = losses(a), losses(b)
  assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
  assert len(set(la.values())) > 1  # it trains
  assert_same(la, lb, range(1, STEPS + 1))
  assert len(glob.glob(str(b / "events.out.tfevents.*"))) == 1  # only process 0 writes logs

  # Cross-restore: the 2-process checkpoint of step 3 continues in 1 process and vice versa, and
  # both end where the uninterrupted runs ended. (Same total_steps, so the same compiled programs.)
  c1, c2 = tmp_path / "two_then_one", tmp_path / "one_then_two"
  resume_from(b, c1, RESUME)
  resume_from(a, c2, RESUME)
  p1 = start_one_process(tmp_path, c1, tmp_path / "data_a", steps=STEPS)
  p2 = start_two_processes(tmp_path, c2, tmp_path / "data_b", steps=STEPS)
  log_1, log_2 = finish(p1, c1), finish(p2, c2)
  for log in (log_1, log_2):
    assert f"resumed from the checkpoint at step {RESUME}" in log, log[-3000:]
  l1, l2 = losses(c1), losses(c2)
  assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
  assert_same(l1, la, range(RESUME + 1, STEPS + 1))
  assert_same(l2, la, range(RESUME + 1, STEPS + 1))


def test_two_processes_stop_together_on_sigterm(tmp_path):
  """A preemption drill: SIGTERM to the launcher reaches both processes; JAX's preemption service
  makes them agree on a step, both take part in the checkpoint, and the run exits 0."""
  w = tmp_path / "drill"
  proc = start_two_processes(tmp_path, w, tmp_path / "data", steps=100_000)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(w / "metrics.jsonl") and len(losses(w)) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both processes
  log = finish(proc, w)
  m = re.search(r"preempted: checkpoint at step (\d+) saved", log)
  assert m, log[-3000:]
  step = int(m.group(1))
  assert os.path.isdir(w / "checkpoints" / str(step))
  assert not os.path.exists(w / "train_done.json")
  other = glob.glob(str(tmp_path / "mae_jax_local.*" / "process_1.log"))
  assert other and f"preempted: checkpoint at step {step} saved" in pathlib.Path(other[-1]).read_text()


# ------------------------------------------------------------------------- launch scripts, flags


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_parses(script):
  r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  if shutil.which("shellcheck"):
    r = subprocess.run(["shellcheck", "-x", "-s", "bash", str(script)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_maps_every_launcher_to_the_same_command():
  text = README.read_text()
  assert "python -m mae_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR" in text
  for script in SCRIPTS:
    rel = f"launch/{script.name}"
    if script.name == "gpu_env.sh":
      assert rel in text
      continue
    # Each launcher's example passes main's own arguments through.
    lines = [ln for ln in text.splitlines() if rel in ln and "--config=configs/" in ln]
    assert lines, f"launch/README.md has no example command for {rel}"
    assert all(re.search(r"--config=configs/\S+ --workdir=\S+$", ln) for ln in lines), lines
  cmd = readme_local_command()
  assert cmd[0] == "launch/local.sh" and "--processes=2" in cmd and "--cpu-devices=2" in cmd


def test_gpu_flags_exist_in_the_pinned_jaxlib(tmp_path):
  """XLA aborts on an unknown flag: the flags launch/gpu_env.sh applies must all parse."""
  probe = (f"source {LAUNCH / 'gpu_env.sh'} && echo \"$XLA_FLAGS\" && "
           f"{shlex.quote(sys.executable)} -c 'import jax; jax.numpy.zeros(1).block_until_ready()'")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in r.stdout
  env["XLA_FLAGS"] = "--xla_gpu_no_such_flag=true"  # the probe can fail
  r = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"], env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0


def test_local_launcher_fails_fast(tmp_path):
  env = _env(tmp_path)
  r = subprocess.run(["bash", "launch/local.sh", "--processes=two"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "--processes=two" in r.stderr
  # A process that fails (no --workdir) ends the launch with its status instead of hanging.
  r = subprocess.run(["bash", "launch/local.sh", "--processes=2", "--cpu-devices=1",
                      "--config=configs/mae.py:smoke"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0 and "exited with status" in r.stderr


# ------------------------------------------------------------------------------ cluster detection


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    # The batch script of a 16-task job is one process: it must not wait for 15 others.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "16",
      "SLURM_PROCID": "3"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, False),
    ({"JOBSET_NAME": "mae"}, True),
])
def test_cluster_detection(env, expected):
  assert distributed._cluster_detected(env) is expected


def test_explicit_coordinator_errors(monkeypatch):
  monkeypatch.setenv("MAE_JAX_COORDINATOR", "127.0.0.1:1234")
  monkeypatch.delenv("MAE_JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("MAE_JAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="MAE_JAX_NUM_PROCESSES"):
    distributed.maybe_initialize()
  monkeypatch.setenv("MAE_JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("MAE_JAX_PROCESS_ID", "2")
  with pytest.raises(ValueError, match="MAE_JAX_PROCESS_ID=2"):
    distributed.maybe_initialize()
  monkeypatch.setenv("MAE_JAX_PROCESS_ID", "x")
  with pytest.raises(ValueError, match="MAE_JAX_PROCESS_ID='x'"):
    distributed.maybe_initialize()
  # One process needs no coordinator.
  monkeypatch.setenv("MAE_JAX_NUM_PROCESSES", "1")
  monkeypatch.setenv("MAE_JAX_PROCESS_ID", "0")
  assert distributed.maybe_initialize() is False
