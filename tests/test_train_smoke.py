"""The smoke run on the real command line (issue 2 acceptance): it trains (the loss falls), leaves a
checkpoint, config.json, metrics.jsonl and TensorBoard events, prints only our progress lines, and a
second invocation with more steps continues from the saved step."""

import glob
import json
import os
import re

import numpy as np
import pytest

from mae_jax.train import loop
from tests import train_helpers as H


@pytest.fixture(scope="module", autouse=True)
def _dataset():
  H.build_smoke_dataset()


def test_smoke_run_then_continue(tmp_path):
  wd = tmp_path / "w"
  rc, out = H.run(H.cli(wd, "--config.train.log_every=1"), tmp_path / "run1.log")
  assert rc == 0, out
  records = loop.read_metrics(str(wd))
  assert [r["step"] for r in records] == list(range(1, 61))
  losses = np.array([r["loss"] for r in records])
  assert np.isfinite(losses).all()
  assert losses[-10:].mean() < losses[:10].mean(), losses
  assert H.committed_steps(wd)[-1] == 60
  assert json.loads((wd / "config.json").read_text())["train"]["total_steps"] == 60
  assert glob.glob(str(wd / "events.out.tfevents.*"))
  assert json.loads((wd / "train_done.json").read_text())["step"] == 60
  assert re.search(r" I \[60\] .*loss=", out) and "(60/60), ETA: " in out
  assert "done: pretrain finished at step 60" in out.splitlines()[-1]
  assert (wd / "log.txt").read_text().splitlines()[-1] == out.splitlines()[-1]

  # Quiet: our own lines (metrics, progress, one parameter line) and warnings only, no
  # library INFO chatter or progress bars.
  for line in out.splitlines():
    if re.match(r"\d\d:\d\d:\d\d I ", line):
      assert re.match(r"\d\d:\d\d:\d\d I (pretrain in |\[\d+\] |progress: |recipe=|compiling and running|first step|"
                      r"resumed from|done: |\w+ \w+ parameters: |$)", line), line
  assert "orbax" not in out.lower() and "Using custom data configuration" not in out

  rc, out = H.run(H.cli(wd, "--config.train.log_every=1", "--config.train.total_steps=70"),
                  tmp_path / "run2.log")
  assert rc == 0, out
  assert "resumed from the checkpoint at step 60" in out
  assert "(62/70)" in out and "[1] " not in out
  assert [r["step"] for r in loop.read_metrics(str(wd))] == list(range(1, 71))
  assert H.committed_steps(wd)[-1] == 70
  assert json.loads((wd / "train_done.json").read_text())["step"] == 70
  assert os.path.exists(wd / "data_stats.json")
