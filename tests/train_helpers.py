"""Running `python -m mae_jax.main` in a subprocess and watching its workdir, for the training tests.

The smoke dataset is built once in the test process first (the conftest points MAE_JAX_DATA at a
shared cache), so concurrent subprocesses never race to build it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from mae_jax import validate
from tests.conftest import REPO, load_config

SMOKE = f"--config={REPO / 'configs' / 'mae.py'}:smoke"
# Every step in metrics.jsonl, no image summaries (they compile a second function).
FAST = ("--config.train.log_every=1", "--config.train.image_every=0")


def smoke_config(**train):
  c = load_config("mae", "smoke")
  c.train.log_every, c.train.image_every = 1, 0
  for k, v in train.items():
    c.train[k] = v
  return c


def build_smoke_dataset() -> None:
  from mae_jax.data import sources
  sources.open_source(load_config("mae", "smoke").data, "train")


def cli(workdir, *overrides) -> list[str]:
  return [sys.executable, "-m", "mae_jax.main", SMOKE, f"--workdir={workdir}", *overrides]


def env() -> dict:
  e = dict(os.environ)
  e.setdefault("JAX_PLATFORMS", "cpu")
  # Subprocesses share compiled executables (the train step compiles in ~20 s on 2 busy cores).
  # XLA compiles deterministically, so a cached step is the step a fresh compile would give.
  e.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mae_jax_test_jax_cache"))
  e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  e.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return e


def start(args, log_path) -> subprocess.Popen:
  """The command with stdout and stderr in `log_path` (a pipe nobody reads could fill and block it)."""
  f = open(log_path, "w")
  proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
  f.close()
  return proc


def run(args, log_path, timeout=300) -> tuple[int, str]:
  proc = start(args, log_path)
  try:
    rc = proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return rc, read(log_path)


def read(path) -> str:
  with open(path) as f:
    return f.read()


def committed_steps(workdir) -> list[int]:
  return validate.checkpoint_steps(str(workdir))


def wait_for(predicate, proc: subprocess.Popen, log_path, what: str, timeout: float = 300):
  """Polls `predicate()` until true; fails early (with the log) when the process exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if proc.poll() is not None:
      raise AssertionError(f"process exited (rc {proc.returncode}) before {what}:\n{read(log_path)[-4000:]}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"timed out waiting for {what}:\n{read(log_path)[-4000:]}")


def logged_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  from mae_jax.train import loop
  return [r["step"] for r in loop.read_metrics(str(workdir))]
