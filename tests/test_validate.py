"""Config validation (issue 7, acceptance 5): every rule fails before anything compiles, with an
error naming the field and the value; typos and wrong types on the command line fail before
anything runs."""

import os
import subprocess
import sys

import pytest

from mae_jax import validate
from tests import train_helpers as H
from tests.conftest import REPO, load_config


def _smoke(name="mae", arg="smoke"):
  return load_config(name, arg)


def _set(c, path, value):
  *parents, leaf = path.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


# (config file, field, bad value, devices). The error must read "config.<field>=<value!r>".
PRETRAIN_CASES = [
    ("mae", "model.image_size", 36, 1),  # not a multiple of the smoke patch size 8
    ("mae", "model.image_size", 0, 1),
    ("mae", "model.patch_size", -8, 1),
    ("mae", "model.mask_ratio", 1.0, 1),
    ("mae", "model.mask_ratio", -0.1, 1),
    ("mae", "model.in_chans", 2, 1),
    ("mae", "model.variant", "xl", 1),
    ("mae", "model.path", "vae", 1),
    ("mae", "model.dtype", "float16", 1),
    ("mae", "model.loss_on", "visible", 1),
    ("mae", "model.decoder_width", 33, 1),  # decoder_heads = 2
    ("mae", "model.decoder_depth", 0, 1),
    ("mae", "model.decoder_heads", 0, 1),
    ("mae", "model.blur_embed", "token", 1),  # only D²MAE has a blurriness embedding
    ("mae", "recipe", "simclr", 1),
    ("mae", "train.batch_size", 30, 4),  # not divisible by 4 devices
    ("mae", "train.batch_size", 0, 1),
    ("mae", "train.grad_accum", 3, 1),  # 32 rows do not split into 3 micro-batches
    ("mae", "train.grad_accum", -1, 1),
    ("mae", "train.base_lr", 0.0, 1),
    ("mae", "train.min_lr", -1e-6, 1),
    ("mae", "train.weight_decay", -0.1, 1),
    ("mae", "train.b1", 1.0, 1),
    ("mae", "train.b2", -0.5, 1),
    ("mae", "train.grad_clip", -1.0, 1),
    ("mae", "train.warmup_epochs", -1.0, 1),
    ("mae", "train.max_bad_steps", 0, 1),
    ("mae", "train.log_every", 0, 1),
    ("mae", "train.log_every_secs", 0.0, 1),
    ("mae", "train.profile_steps", -1, 1),
    ("mae", "train.image_every", -1, 1),
    ("mae", "train.checkpoint_every", 0, 1),
    ("mae", "train.keep_checkpoints", 0, 1),
    ("mae", "seed", -1, 1),
    ("mae", "data.name", "imagenet", 1),
    ("mae", "data.sampler", "random", 1),
    ("mae", "data.crop_scale_min", 0.0, 1),
    ("mae", "data.crop_scale_min", 1.5, 1),
    ("mae", "data.num_train", 0, 1),
    ("mae", "data.num_test", -1, 1),
    ("mae", "data.native_size", 4, 1),
    ("mae", "data.std", 0.0, 1),
    ("mae", "data.seed", -3, 1),
    ("mae", "mesh.fsdp", 3, 4),
    ("d2mae", "corrupt.sigma_levels", "1.1:0.1:0.1", 1),  # empty: stop < start
    ("d2mae", "corrupt.sigma_levels", "0.1:1.1:0", 1),  # empty: zero step
    ("d2mae", "corrupt.sigma_levels", "", 1),
    ("d2mae", "corrupt.sigma_levels", "0.1-1.1", 1),
    ("d2mae", "corrupt.blur", "srad", 1),  # D²MAE's blur is a Gaussian of σ_t
    ("deblur_mae", "corrupt.blur", "bokeh", 1),
    ("deblur_mae", "corrupt.sigma", 0.0, 1),
    ("denoise_mae", "corrupt.noise_std", 0.0, 1),
    ("usfm", "corrupt.spatial_unit", 12, 1),  # not a multiple of the patch size
    ("usfm", "corrupt.spatial_ratio", 1.0, 1),
    ("usfm", "corrupt.freq_base_bw", 1, 1),  # not above freq_center_protect (1 in the smoke config)
    ("usfm", "corrupt.freq_ratio", 1.5, 1),
    ("usfm", "model.ffl_weight", -0.4, 1),
    ("usfm", "model.path", "mae", 1),
]


@pytest.mark.parametrize("name,field,value,devices", PRETRAIN_CASES,
                         ids=[f"{n}:{f}={v!r}" for n, f, v, _ in PRETRAIN_CASES])
def test_pretrain_rule_names_the_field(name, field, value, devices):
  c = _smoke(name)
  validate.validate_pretrain(c, num_devices=devices)  # the smoke config itself is valid ...
  _set(c, field, value)
  with pytest.raises(ValueError) as err:
    validate.validate_pretrain(c, num_devices=devices)
  assert str(err.value).startswith(f"config.{field}={value!r}: "), str(err.value)


@pytest.mark.parametrize("blur,kernel", [("mean", 4), ("median", 0), ("motion", -3)])
def test_blur_kernel_must_be_odd(blur, kernel):
  c = _smoke("deblur_mae")
  c.corrupt.blur, c.corrupt.kernel = blur, kernel
  with pytest.raises(ValueError, match=rf"^config\.corrupt\.kernel={kernel}: "):
    validate.validate_pretrain(c, num_devices=1)


def test_srad_and_defocus_parameters():
  c = _smoke("deblur_mae")
  c.corrupt.blur = "srad"
  for field, value in (("srad_iters", 0), ("srad_dt", 0.0)):
    bad = c.copy_and_resolve_references()
    bad.corrupt[field] = value
    with pytest.raises(ValueError, match=rf"^config\.corrupt\.{field}="):
      validate.validate_pretrain(bad, num_devices=1)
  c.corrupt.blur, c.corrupt.defocus_radius = "defocus", -1
  with pytest.raises(ValueError, match=r"^config\.corrupt\.defocus_radius=-1: "):
    validate.validate_pretrain(c, num_devices=1)


def test_batch_must_split_over_processes():
  c = _smoke()
  c.train.batch_size = 30
  with pytest.raises(ValueError, match=r"^config\.train\.batch_size=30: .*process count \(4\)"):
    validate.validate_pretrain(c, num_devices=2, process_count=4)


def test_mean_and_std_come_together():
  c = _smoke()
  c.data.mean = 0.3
  with pytest.raises(ValueError, match=r"^config\.data\.std=None: "):
    validate.validate_pretrain(c, num_devices=1)


def test_folder_must_be_a_directory(tmp_path):
  c = _smoke()
  c.data.name, c.data.folder = "folder", str(tmp_path / "missing")
  with pytest.raises(ValueError, match=r"^config\.data\.folder=.*missing.*is not a directory"):
    validate.validate_pretrain(c, num_devices=1)


def test_epochs_or_steps():
  c = _smoke()
  c.train.total_steps, c.train.epochs = 0, 0
  with pytest.raises(ValueError, match=r"^config\.train\.epochs=0"):
    validate.validate_pretrain(c, num_devices=1)


# ------------------------------------------------------------------------------ init_from


def _transfer_config(path):
  c = _smoke()
  c.init_from = str(path)
  return c


def test_init_from_empty_means_from_scratch():
  validate.validate_transfer(_transfer_config(""))


def test_init_from_missing_directory(tmp_path):
  with pytest.raises(ValueError, match=r"^config\.init_from=.*nope.*is not a directory"):
    validate.validate_transfer(_transfer_config(tmp_path / "nope"))


def test_init_from_without_config(tmp_path):
  with pytest.raises(ValueError, match=r"^config\.init_from=.*holds no config\.json"):
    validate.validate_transfer(_transfer_config(tmp_path))


def test_init_from_without_a_committed_checkpoint(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"^config\.init_from=.*holds no complete checkpoint"):
    validate.validate_transfer(_transfer_config(tmp_path))
  # A step orbax never committed (killed while writing) does not count.
  os.makedirs(tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1700000000")
  with pytest.raises(ValueError, match=r"^config\.init_from=.*holds no complete checkpoint"):
    validate.validate_transfer(_transfer_config(tmp_path))


def test_init_from_a_real_pretraining_workdir(tmp_path):
  import jax
  from mae_jax.train import checkpoint, core, optim
  c = _smoke()
  core.save_config(c, str(tmp_path))
  tx = optim.adamw(lambda s: 1e-3, b1=0.9, b2=0.95, weight_decay=0.0)
  state = core.init_state({"w": jax.numpy.ones((2, 2))}, tx, 0)
  mngr = checkpoint.checkpoint_manager(str(tmp_path), keep=1, async_save=False)
  checkpoint.save_checkpoint(mngr, 7, state, {"next_batch": 7})
  mngr.close()
  validate.validate_transfer(_transfer_config(tmp_path))
  assert validate.checkpoint_steps(str(tmp_path)) == [7]
  # Another field name, for jobs that call it something else.
  c2 = _smoke()
  c2.pretrained = str(tmp_path / "elsewhere")
  with pytest.raises(ValueError, match=r"^config\.pretrained="):
    validate.validate_transfer(c2, field="pretrained")


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("flag,needle", [
    ("--config.train.batch_sizee=3", "batch_sizee"),  # typo: no such field
    ("--config.trian.batch_size=3", "trian"),
    ("--config.train.batch_size=abc", "config.train.batch_size"),  # wrong type
    ("--config.train.batch_size=3.5", "config.train.batch_size"),
    ("--config.model.mask_ratio=1.0", "config.model.mask_ratio=1.0"),  # a validation rule
])
def test_cli_fails_before_anything_runs(tmp_path, flag, needle):
  wd = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-m", "mae_jax.main", H.SMOKE, f"--workdir={wd}", flag],
                        capture_output=True, text=True, env=H.env(), cwd=REPO, timeout=120)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out
  assert needle in out, out
  assert not wd.exists()  # nothing was written: no config.json, no checkpoint, no dataset work


def test_auto_compute_dtype_is_bfloat16_only_on_accelerators():
  import jax.numpy as jnp

  from mae_jax import models
  assert load_config("mae", "").model.dtype == "auto"
  assert models.compute_dtype("auto", backend="gpu") == jnp.bfloat16
  assert models.compute_dtype("auto", backend="tpu") == jnp.bfloat16
  assert models.compute_dtype("auto", backend="cpu") == jnp.float32
  assert models.compute_dtype("float32", backend="gpu") == jnp.float32
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    models.compute_dtype("float16")


def test_d2mae_config_says_its_blur_is_gaussian():
  """config.json of a D²MAE run once said blur='none' though every image is blurred."""
  c = _smoke("d2mae")
  assert c.corrupt.blur == "gaussian"
  validate.validate_pretrain(c, num_devices=1)
