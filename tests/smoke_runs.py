"""Every recipe's smoke config pretrained for a few steps, once per test session, for the figure and
notebook tests (tests/test_visualize.py, tests/test_notebook.py).

Under pytest-xdist each worker is its own process with its own temp dir; the workdirs live in the
session's common temp dir instead, one file lock per recipe, so a recipe is trained once and two
workers can train two different recipes at the same time.
"""

from __future__ import annotations

import fcntl
import os

from mae_jax import visualize

RECIPES = ("mae", "deblur", "denoise", "d2mae", "usfm")
STEPS = 2
# No TensorBoard image summaries: they would compile a second function for nothing here.
OVERRIDES = {"train.image_every": 0}


def shared_root(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # pytest-of-USER/pytest-N: common to this session's workers
  root = base / "smoke_pretrain"
  root.mkdir(parents=True, exist_ok=True)
  return root


def smoke_workdir(root, recipe: str) -> str:
  workdir = root / recipe
  with open(root / f".{recipe}.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      visualize.pretrain_demo(recipe, str(workdir), steps=STEPS, overrides=OVERRIDES, quiet=True)
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
  return str(workdir)
