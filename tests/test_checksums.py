"""Checkpoint checksums (issue 27, item 3): single-byte rot in a checkpoint's array data is either
harmless (restored bit-identical) or detected (set aside, the previous checkpoint restored, one
warning); a changed array is never restored. Before checksums, 19 of 20 such flips restored silently
wrong weights (the data files are zstd without a content checksum)."""

from __future__ import annotations

import logging
import pathlib
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mae_jax.train import checkpoint, checksums, core

FLIPS = 24


def _state(seed: int):
  rng = np.random.default_rng(seed)
  params = {"blocks": {0: {"kernel": jnp.asarray(rng.normal(0, 0.02, (64, 96)), jnp.float32),
                           "bias": jnp.asarray(rng.normal(0, 0.02, (96,)), jnp.float32)}},
            "embed": jnp.asarray(rng.normal(0, 0.02, (48, 64)), jnp.float32)}
  tx = optax.adamw(1e-3)
  state = core.init_state(params, tx, seed)
  # Moments that are not all zero, as after some steps.
  state.opt_state = jax.tree.map(lambda x: x + 0.001 if x.dtype == jnp.float32 and x.ndim else x, state.opt_state)
  return state


def _host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))
  return len(la) == len(lb) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


def test_digest_is_the_crc32_of_the_bytes_and_names_match_with_or_without_a_target():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert checksums.arrays({"a": {0: x}}) == {"a/0": f"{zlib.crc32(b'<f4(2, 3)' + x.tobytes()):08x}"}
  state = _state(0)
  as_dataclass = checksums.arrays(state, "state/")
  as_dict = checksums.arrays({"params": state.params}, "state/")  # orbax without a target: str keys
  as_str_keys = checksums.arrays({"params": {"blocks": {"0": state.params["blocks"][0]},
                                             "embed": state.params["embed"]}}, "state/")
  assert as_dict == as_str_keys
  assert as_dict.items() <= as_dataclass.items()
  assert "state/params/blocks/0/kernel" in as_dict


def test_verify_names_the_changed_array_and_the_changed_json():
  state = _state(0)
  record = checksums.record({"state": state}, {"next_batch": 3})
  assert checksums.verify(record, {"state": state}, {"next_batch": 3}) == len(jax.tree.leaves(state))
  bad = _host(state)
  raw = bad.params["embed"].view(np.uint32)
  raw[5, 7] ^= 1 << 30
  with pytest.raises(checksums.Mismatch, match="state/params/embed differs"):
    checksums.verify(record, {"state": bad}, {"next_batch": 3})
  with pytest.raises(checksums.Mismatch, match="JSON item"):
    checksums.verify(record, {"state": state}, {"next_batch": 4})
  assert checksums.verify(None, {"state": bad}) == 0  # a checkpoint saved before checksums


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The files holding the state's array data (OCDBT data files), biggest first."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, sorted(step_dir.rglob("*"))
  return sorted(files, key=lambda p: -p.stat().st_size)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  states = {1: _state(1), 2: _state(2)}
  mngr = checkpoint.checkpoint_manager(str(root), keep=2, async_save=False)
  for step, state in states.items():
    checkpoint.save_checkpoint(mngr, step, state, {"next_batch": step}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return root, states


def test_bit_flips_in_the_newest_checkpoint_never_restore_changed_weights(two_checkpoints, tmp_path, caplog):
  """Flips one byte at each of 24 positions spread over the newest checkpoint's array data; each
  restore must give the saved state bit for bit, or fall back to step 1 (exact) with one warning."""
  root, states = two_checkpoints
  size = sum(p.stat().st_size for p in _array_files(root / "checkpoints" / "2"))
  outcomes = []
  for i in range(FLIPS):
    work = tmp_path / f"w{i}"
    shutil.copytree(root, work)
    offset = (2 * i + 1) * size // (2 * FLIPS)  # evenly over every data byte, headers included
    for f in _array_files(work / "checkpoints" / "2"):
      if offset < f.stat().st_size:
        data = bytearray(f.read_bytes())
        data[offset] ^= 0xFF
        f.write_bytes(bytes(data))
        break
      offset -= f.stat().st_size
    caplog.clear()
    mngr = checkpoint.checkpoint_manager(str(work), keep=2, async_save=False)
    try:
      with caplog.at_level(logging.WARNING, logger="mae_jax"):
        r = checkpoint.restore_checkpoint(mngr, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                       states[2]))
    except checkpoint.NoGoodCheckpoint:
      pytest.fail(f"flip {i}: step 1 was intact but not restored")
    finally:
      mngr.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "mae_jax"]
    assert _same(r.state, states[r.step]), f"flip {i}: step {r.step} restored with changed weights"
    assert r.data == {"next_batch": r.step}
    if r.step == 2:
      assert warnings == [], (i, warnings)
      outcomes.append("intact")
    else:
      assert r.step == 1 and len(warnings) == 1, (i, warnings)
      assert "checkpoint 2 in" in warnings[0] and "moved aside to bad-2" in warnings[0]
      assert (work / "checkpoints" / "bad-2").is_dir()
      outcomes.append("fell back")
  print(f"{FLIPS} flips: {outcomes.count('fell back')} fell back, {outcomes.count('intact')} restored intact")
  assert outcomes.count("fell back") >= FLIPS // 2  # the flips did hit the data


def test_restore_params_of_a_damaged_init_from_uses_the_checkpoint_before(two_checkpoints, tmp_path, caplog):
  """A downstream job reading init_from: the damaged newest checkpoint is reported and skipped
  (never moved: it is another run's workdir); the one before is used."""
  root, states = two_checkpoints
  work = tmp_path / "pre"
  shutil.copytree(root, work)
  f = _array_files(work / "checkpoints" / "2")[0]
  data = bytearray(f.read_bytes())
  for k in range(len(data) // 3, len(data) // 3 + 8):
    data[k] ^= 0x10
  f.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING, logger="mae_jax"):
    step, params = checkpoint.restore_params(str(work))
  assert step == 1
  assert _same(params["blocks"][0], states[1].params["blocks"][0]) and _same(params["embed"], states[1].params["embed"])
  assert [r.getMessage() for r in caplog.records if r.name == "mae_jax"][0].startswith(
      f"checkpoint 2 in {work}/checkpoints is unreadable")
  assert not (work / "checkpoints" / "bad-2").exists()
  with pytest.raises(checkpoint.NoGoodCheckpoint, match="checkpoint 2 in"):
    checkpoint.restore_params(str(work), step=2)


def test_restore_params_skips_an_empty_numbered_checkpoint_folder(two_checkpoints, tmp_path, caplog):
  """Issue 27 item 7: an init_from whose newest numbered checkpoint folder is empty (a save killed
  before it wrote anything) gives the last good checkpoint with one warning, as pretraining does."""
  root, states = two_checkpoints
  work = tmp_path / "pre"
  shutil.copytree(root, work)
  (work / "checkpoints" / "7").mkdir()
  with caplog.at_level(logging.WARNING, logger="mae_jax"):
    step, params = checkpoint.restore_params(str(work))
  assert step == 2
  assert _same(params["embed"], states[2].params["embed"])
  warnings = [r.getMessage() for r in caplog.records if r.name == "mae_jax" and r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint 7 in {work}/checkpoints is unreadable")
