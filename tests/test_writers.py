"""The training loops' metrics and progress (mae_jax/train/writers.py, clu underneath): which steps
get a metrics line, what TensorBoard reads back, the first step's time, the profiler trace."""

import glob
import logging

import jax.numpy as jnp
import ml_collections
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from mae_jax.train import writers


def _train(**kw):
  return ml_collections.ConfigDict({"log_every": 5, "log_every_secs": 3600.0, "profile_steps": 0, **kw})


def _scalars(logdir, tag):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)}


def test_metrics_lines_on_schedule_first_step_and_last(tmp_path, caplog):
  mon = writers.Monitor(str(tmp_path), _train(), total_steps=14, start=0, is_main=True)
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    mon.before_first_step()
    logged = [s for s in range(1, 15) if mon.after_step(s, {"loss": jnp.float32(s) / 2}) is not None]
  mon.close()
  # The first step (its time, compile included), every 5th, the last.
  assert logged == [1, 5, 10, 14]
  assert [s for s in range(1, 15) if mon.scheduled(s)] == [5, 10, 14]
  assert any(r.getMessage().startswith("first step compiled and ran in ") for r in caplog.records)
  assert _scalars(tmp_path, "loss") == {1: 0.5, 5: 2.5, 10: 5.0, 14: 7.0}
  # ReportProgress: steps/s from its first call on, at its own steps (every 5 and the last).
  assert sorted(_scalars(tmp_path, "steps_per_sec")) == [5, 10, 14]


def test_slow_steps_still_log_once_per_interval(tmp_path):
  # An interval shorter than any step: every step gets its line, whatever log_every says.
  mon = writers.Monitor(str(tmp_path), _train(log_every=1000, log_every_secs=1e-9), total_steps=4,
                        start=0, is_main=True)
  logged = [s for s in range(1, 5) if mon.after_step(s, {"loss": jnp.float32(s)}) is not None]
  mon.close()
  assert logged == [1, 2, 3, 4]


def test_profile_steps_write_a_trace(tmp_path):
  mon = writers.Monitor(str(tmp_path), _train(profile_steps=2), total_steps=20, start=0, is_main=True)
  for s in range(1, 21):
    mon.after_step(s, {"loss": jnp.sin(jnp.float32(s))})
  mon.close()
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_parameter_table(caplog):
  # clu logs through absl's logger, which stops propagating to the root (where caplog listens) once
  # an absl app has run in this process (another test may have): listen on it directly.
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(caplog.handler)
  try:
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
      writers.log_parameters({"blocks": {0: {"kernel": jnp.zeros((3, 4))}}, "bias": jnp.zeros(4)}, "toy")
  finally:
    absl_logger.removeHandler(caplog.handler)
  text = "\n".join(r.getMessage() for r in caplog.records)
  assert "blocks/0/kernel" in text and "(3, 4)" in text and "Total: 16" in text


@pytest.mark.parametrize("is_main", [True, False])
def test_only_process_0_writes_events(tmp_path, is_main):
  mon = writers.Monitor(str(tmp_path), _train(), total_steps=2, start=0, is_main=is_main)
  mon.after_step(1, {"loss": jnp.float32(1)})
  mon.close()
  assert bool(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == is_main
