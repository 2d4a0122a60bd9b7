"""The `:demo` variant, its reconstruction score against the mean fill, and the up-front CPU cost
estimate of a large run (issue 29). Nothing here trains the demo itself
(tests/test_notebook.py does, through the notebook)."""

import logging
import re

import numpy as np
import pytest

from mae_jax import recon_quality, validate
from mae_jax.train import cost_estimate, pretrain
from tests.conftest import load_config


@pytest.mark.parametrize("name", ["mae", "deblur_mae", "d2mae", "usfm"])
def test_demo_config_loads_and_validates(name):
  c = load_config(name, "demo")
  smoke = load_config(name, "smoke")
  validate.validate_pretrain(c, num_devices=1)
  # Bigger than smoke (the paper's batch of the recipe does not leak in), and scored at the end.
  assert c.model.variant == "tiny" and smoke.model.variant == "micro"
  assert c.model.patch_size < smoke.model.patch_size
  assert c.train.batch_size == 64 and c.train.total_steps > smoke.train.total_steps
  assert c.train.cpu_micro_batch >= c.train.batch_size  # one micro-batch: no accumulation on CPU
  assert c.train.recon_eval_images > 0 and not smoke.train.get("recon_eval_images", 0)
  assert c.recipe == smoke.recipe


def test_masked_errors_by_hand():
  # Image 0: pixels 0, .2 / .4, 1; the right column masked. Visible mean (0 + .4) / 2 = .2, so the
  # fill errs by 0 and .8: MSE .32. The reconstruction says .3 and 1.5 (clipped to 1): MSE .005.
  x = np.array([[[0.0], [0.2]], [[0.4], [1.0]]])
  m = np.array([[[0.0], [1.0]], [[0.0], [1.0]]])
  r = np.array([[[0.9], [0.3]], [[0.9], [1.5]]])  # visible pixels do not count
  # Image 1 has nothing masked: it is left out of both averages.
  q = recon_quality.masked_errors(np.stack([x, x]), np.stack([r, r]), np.stack([m, 0 * m]))
  assert q["images"] == 1
  assert q["mean_fill"] == pytest.approx(0.32)
  assert q["model"] == pytest.approx(0.005)
  assert q["reduction"] == pytest.approx(1 - 0.005 / 0.32)
  line = recon_quality.describe(q, "x")
  assert "model 0.0050 vs visible-mean fill 0.3200 (98% below, 1 images)" in line
  # A model worse than the fill says so.
  worse = recon_quality.masked_errors(x[None], 1 - x[None], m[None])
  assert worse["reduction"] < 0 and "ABOVE" in recon_quality.describe(worse)
  with pytest.raises(ValueError, match="masked and visible"):
    recon_quality.masked_errors(x[None], r[None], 0 * m[None])


def test_cost_lines_by_hand():
  # ViT-B at batch 1024 in micro-batches of 32 on a CPU: 2.5 s each -> 80 s a step, 15,625 steps
  # -> 1,250,000 s = 14.5 days.
  out = cost_estimate.lines(micro_seconds=2.5, compile_seconds=40.0, micro_batch=32, micro_batches=32,
                            steps_left=15625, platform="cpu", command="--config=configs/d2mae.py --workdir=W",
                            log_every=50, checkpoint_every=1000)
  text = "\n".join(out)
  assert "micro-batch of 32 images ran in 2.5s (compiled in 40s)" in out[0]
  assert "a step is 32 micro-batches, about 1m20s" in out[0]
  assert "15625 steps left take about 14 days" in out[0]
  assert "sbatch launch/slurm.sbatch --config=configs/d2mae.py --workdir=W" in text
  assert "step in flight finishes first (up to about 1m20s)" in text
  assert "every 50 steps (about 1h06m40s)" in text
  # A short run gets no advice to move.
  short = cost_estimate.lines(micro_seconds=0.1, compile_seconds=1.0, micro_batch=16, micro_batches=4,
                              steps_left=10, platform="cpu")
  assert "accelerators" not in "\n".join(short) and "about 0m04s" in short[0]
  # ViT-B (86M encoder parameters), 1024 images of 196 patches: a large step on CPU, not on a GPU;
  # the demo (0.3M parameters, 64 images of 64 patches) is not large.
  vit_b = cost_estimate.step_flops(86_000_000, 1024, 196)
  assert vit_b == pytest.approx(6 * 86e6 * 1024 * 196)
  assert cost_estimate.wanted("cpu", vit_b) and not cost_estimate.wanted("gpu", vit_b)
  assert not cost_estimate.wanted("cpu", cost_estimate.step_flops(306_640, 64, 64))


def test_estimate_before_the_first_step_of_an_accumulating_run(tmp_path, caplog, monkeypatch):
  """A smoke run whose step is 4 micro-batches of 16, counted as large: the estimate comes before
  the first step; the demo's end-of-run score is the held-out images' `masked_errors`."""
  monkeypatch.setattr(cost_estimate, "LARGE_STEP_FLOPS", 1.0)
  timed = []
  real_time_call = cost_estimate.time_call

  def time_call(fn, *args):
    # The real compile and call on the real micro-batch, then times fixed by hand: 1.5 s a
    # micro-batch, so a step of 4 is 6 s, the 2 steps 12 s, and a SIGTERM waits up to 6 s.
    real_time_call(fn, *args)
    timed.append(args[2].shape)
    return 2.0, 1.5

  monkeypatch.setattr(cost_estimate, "time_call", time_call)
  c = load_config("mae", "smoke")
  c.train.batch_size = 64
  c.train.cpu_micro_batch = 16
  c.train.total_steps = 2
  c.train.image_every = 0
  c.train.recon_eval_images = 8
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    out = pretrain.train(c, str(tmp_path))
  msgs = [r.getMessage() for r in caplog.records]
  first = next(i for i, m in enumerate(msgs) if m.startswith("compiling and running the first step"))
  params = next(i for i, m in enumerate(msgs) if "parameters: " in m)
  est = [i for i, m in enumerate(msgs) if "cost estimate" in m]
  assert len(est) == 1 and params < est[0] < first, msgs
  assert timed == [(16, 32, 32, 1)]  # one micro-batch of the step's 4, timed once
  line = msgs[est[0]]
  assert "one micro-batch of 16 images ran in 1.5s (compiled in 2s)" in line
  assert "a step is 4 micro-batches, about 0m06s" in line and "the 2 steps left take about 0m12s" in line
  sigterm = [m for m in msgs[est[0]:first] if m.startswith("SIGTERM")]
  assert sigterm == ["SIGTERM / Ctrl-C acts at the next step boundary: the step in flight finishes "
                     "first (up to about 0m06s), then a checkpoint is saved."]

  from mae_jax import visualize
  pre = visualize.load(str(tmp_path))
  x01, zoom = visualize.load_batch(pre.config, 8)
  rec = visualize.reconstruct(pre.model, pre.config, x01, pre.mean, pre.std, zoom=zoom)
  q = out["recon_quality"]
  assert q == pytest.approx(recon_quality.masked_errors(rec.original, rec.reconstruction, rec.pixel_mask))
  assert q["images"] == 8
  assert any(m.startswith("masked-patch MSE (held-out validation images)") for m in msgs[-3:]), msgs[-3:]


@pytest.mark.parametrize("every_secs", [1e9, 0.0])
def test_metrics_jsonl_holds_every_console_line_when_it_is_shown(tmp_path, caplog, every_secs):
  """Issue 29: `metrics.jsonl` stayed empty while the console showed steps 1 and 2 (a long step, a
  `log_every` far ahead). Every metrics line (the first step's, the once-a-`log_every_secs` ones, the
  schedule's) is readable from the file, by another reader, when the step after it starts."""
  import jax.numpy as jnp
  import ml_collections

  from mae_jax.train import loop, preemption, writers

  total = 6
  tcfg = ml_collections.ConfigDict({"log_every": 100, "log_every_secs": every_secs, "max_bad_steps": 3})
  on_disk = {}  # step -> the steps metrics.jsonl held when the evaluation hook of that step ran

  def evaluate(step, carry):
    on_disk[step] = [r["step"] for r in loop.read_metrics(str(tmp_path))]

  def step(carry, batch):
    return carry + 1, {"loss": jnp.float32(1.0 / (carry + 1)), "bad_streak": jnp.int32(0)}

  job = loop.Job(total=total, start=0, carry=0, batch=lambda s: None, step=step,
                 checkpoint_due=lambda s: False, save=lambda *a: None,
                 latest_checkpoint=lambda: (None, ""), close=lambda: None, evaluate=evaluate)
  monitor = writers.Monitor(str(tmp_path), tcfg, total, 0, True)
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    out = loop.run(job, tcfg, preemption.Preemption(), monitor, str(tmp_path), True)
  monitor.close()
  shown = [int(m.group(1)) for r in caplog.records if (m := re.match(r"\[(\d+)\] ", r.getMessage()))]
  # 1e9 s: only the first step and the last (on the schedule); 0 s: every step.
  assert shown == ([1, total] if every_secs else list(range(1, total + 1)))
  for s in range(1, total + 1):
    assert on_disk[s] == [k for k in shown if k <= s], (s, on_disk)
  assert [r["loss"] for r in loop.read_metrics(str(tmp_path))] == pytest.approx([1.0 / k for k in shown])
  assert out.history == [(total, out.last)]  # the schedule's lines only
