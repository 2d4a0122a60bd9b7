"""The training loops' metrics and progress (mae_jax/train/writers.py): which steps get a metrics
line, what TensorBoard reads back (scalars and images, read with tensorboard's own TF-free reader),
the first step's time, the profiler trace, the parameter table."""

import glob
import io
import logging

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
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
  # Progress: steps/s from the first step on, at its own steps (every 5 and the last).
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


def test_parameter_table_in_log_file_one_console_line(caplog):
  params = {"blocks": {0: {"kernel": jnp.zeros((3, 4))}}, "head": {"w": jnp.zeros((2, 5))}, "bias": jnp.zeros(4)}
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    writers.log_parameters(params, "toy")
  console = [r.getMessage() for r in caplog.records if r.name == "mae_jax"]
  table = "\n".join(r.getMessage() for r in caplog.records if r.name == "mae_jax.log_file")
  # 12 + 10 + 4 = 26, by hand.
  assert console == ["toy: 26 (bias 4, blocks 12, head 10); the table is in log.txt"]
  assert "blocks/0/kernel" in table and "(3, 4)" in table and "Total: 26" in table


def test_images_and_scalars_read_back(tmp_path):
  panel = np.arange(6 * 5, dtype=np.uint8).reshape(6, 5) * 7
  mon = writers.Monitor(str(tmp_path), _train(), total_steps=3, start=0, is_main=True)
  mon.write_images(3, {"reconstruction": panel[..., None], "float": np.array([[0.0, 0.5, 2.0]])})
  mon.write_scalars(3, {"val_accuracy": 0.25})
  mon.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.IMAGES: 0})
  acc.Reload()
  (img,) = acc.Images("reconstruction")
  assert (img.step, img.width, img.height) == (3, 5, 6)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.encoded_image_string))), panel)
  (img,) = acc.Images("float")  # [0, 1] -> 0..255, rounded; out of range clipped
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.encoded_image_string))), [[0, 128, 255]])
  assert _scalars(tmp_path, "val_accuracy") == {3: 0.25}


def test_job_scalars_go_to_log_file_not_console(tmp_path, caplog):
  mon = writers.Monitor(str(tmp_path), _train(), total_steps=3, start=0, is_main=False)
  with caplog.at_level(logging.INFO, logger="mae_jax"):
    mon.write_scalars(2, {"val_dice": 0.5})
  mon.close()
  assert [(r.name, r.getMessage()) for r in caplog.records] == [("mae_jax.log_file", "[2] val_dice=0.5")]


@pytest.mark.parametrize("is_main", [True, False])
def test_only_process_0_writes_events(tmp_path, is_main):
  mon = writers.Monitor(str(tmp_path), _train(), total_steps=2, start=0, is_main=is_main)
  mon.after_step(1, {"loss": jnp.float32(1)})
  mon.close()
  assert bool(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == is_main


def test_two_writers_in_one_second_keep_both_files(tmp_path):
  for step in (1, 2):  # a resumed run in the same process: its events add to the first run's
    mon = writers.Monitor(str(tmp_path), _train(), total_steps=2, start=step - 1, is_main=True)
    mon.after_step(step, {"loss": jnp.float32(step)})
    mon.close()
  assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2
  assert _scalars(tmp_path, "loss") == {1: 1.0, 2: 2.0}
