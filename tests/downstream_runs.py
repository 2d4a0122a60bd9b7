"""The MAE smoke pretraining the downstream tests start from (configs/mae.py:smoke as the command
line runs it, without preview images): trained once per test session under a file lock, and shared
by the test modules and the pytest-xdist workers (see `smoke_runs.shared_root`)."""

from __future__ import annotations

import fcntl

from mae_jax.train import pretrain
from tests import smoke_runs
from tests.conftest import load_config


def mae_smoke_pretrain(tmp_path_factory) -> str:
  root = smoke_runs.shared_root(tmp_path_factory)
  workdir = root / "mae_smoke_full"
  with open(root / ".mae_smoke_full.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "train_done.json").exists():
      c = load_config("mae", "smoke")
      c.train.image_every = 0  # no preview images: they compile a second function
      pretrain.train(c, str(workdir))
  return str(workdir)
