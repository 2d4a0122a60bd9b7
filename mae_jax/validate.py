"""Config checks that run before anything compiles. Each error names the field and its value."""

from __future__ import annotations

import json
import os

from mae_jax import recipes
from mae_jax.corrupt import blur as blur_lib
from mae_jax.corrupt import masking
from mae_jax.corrupt import frequency
from mae_jax.presets import PRESETS


def _fail(field: str, value, why: str):
  raise ValueError(f"config.{field}={value!r}: {why}")


def validate_model(m) -> None:
  if m.variant not in PRESETS:
    _fail("model.variant", m.variant, f"expected one of {sorted(PRESETS)}")
  patch = m.patch_size or PRESETS[m.variant][3]
  if m.image_size <= 0 or m.image_size % patch:
    _fail("model.image_size", m.image_size, f"must be a positive multiple of the patch size {patch}")
  if m.in_chans not in (1, 3):
    _fail("model.in_chans", m.in_chans, "expected 1 (grayscale) or 3")
  if not 0.0 <= m.mask_ratio < 1.0:
    _fail("model.mask_ratio", m.mask_ratio, "must lie in [0, 1)")
  if m.path not in ("mae", "simmim"):
    _fail("model.path", m.path, "expected 'mae' or 'simmim'")
  if m.dtype not in ("auto", "float32", "bfloat16"):
    _fail("model.dtype", m.dtype, "expected 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'")
  if m.loss_on not in ("masked", "all"):
    _fail("model.loss_on", m.loss_on, "expected 'masked' or 'all'")
  if m.blur_embed not in ("none", "token", "add"):
    _fail("model.blur_embed", m.blur_embed, "expected 'none', 'token' or 'add'")
  if m.patch_size < 0:
    _fail("model.patch_size", m.patch_size, "must be >= 0 (0: the preset's patch size)")
  if m.path == "mae":
    if m.decoder_depth < 1:
      _fail("model.decoder_depth", m.decoder_depth, "must be >= 1")
    if m.decoder_heads < 1:
      _fail("model.decoder_heads", m.decoder_heads, "must be >= 1")
    if m.decoder_width < 1 or m.decoder_width % m.decoder_heads:
      _fail("model.decoder_width", m.decoder_width,
            f"must be a positive multiple of decoder_heads={m.decoder_heads}")


def validate_data(d) -> None:
  """The dataset fields every job reads."""
  if d.name not in ("us_phantom", "folder"):
    _fail("data.name", d.name, "expected 'us_phantom' or 'folder'")
  if d.name == "folder" and not os.path.isdir(os.path.expanduser(d.folder or "")):
    _fail("data.folder", d.folder, "is not a directory")
  if d.name == "us_phantom":
    if d.num_train < 1:
      _fail("data.num_train", d.num_train, "must be >= 1")
    for name in ("num_validation", "num_test"):
      if d[name] < 0:
        _fail(f"data.{name}", d[name], "must be >= 0")
    if d.native_size < 8:
      _fail("data.native_size", d.native_size, "must be >= 8 pixels")
  if d.std is not None and not d.std > 0:
    _fail("data.std", d.std, "must be > 0")
  if (d.mean is None) != (d.std is None):
    _fail("data.std" if d.std is None else "data.mean", None,
          "set data.mean and data.std together, or neither (both measured on the training split)")
  if d.seed < 0:
    _fail("data.seed", d.seed, "must be >= 0")


def validate_pretrain(config, *, num_devices: int, process_count: int = 1) -> None:
  validate_model(config.model)
  if config.recipe not in recipes.RECIPES:
    _fail("recipe", config.recipe, f"expected one of {recipes.RECIPES}")
  c, t, d = config.corrupt, config.train, config.data
  if config.recipe == "deblur" and c.blur not in blur_lib.BLURS:
    _fail("corrupt.blur", c.blur, f"expected one of {sorted(blur_lib.BLURS)}")
  if config.recipe == "deblur" and c.blur == "gaussian" and c.sigma <= 0:
    _fail("corrupt.sigma", c.sigma, "must be > 0")
  if c.get("sigma_units", "native") not in recipes.SIGMA_UNITS:
    _fail("corrupt.sigma_units", c.sigma_units,
          f"expected one of {recipes.SIGMA_UNITS} (native: σ in the stored image's pixels)")
  if c.get("kernel_units", "native") not in recipes.SIGMA_UNITS:
    _fail("corrupt.kernel_units", c.kernel_units,
          f"expected one of {recipes.SIGMA_UNITS} (native: kernel sizes in the stored image's pixels)")
  gaussian = config.recipe == "d2mae" or (config.recipe == "deblur" and c.blur == "gaussian")
  if gaussian and recipes.native_units(c) and config.data.native_size < 8:
    _fail("data.native_size", config.data.native_size,
          "with corrupt.sigma_units='native' it is the smallest stored image side, which sizes the "
          "blur kernel: must be >= 8 pixels")
  validate_augment(config.get("augment"))
  if config.recipe == "denoise" and c.noise_std <= 0:
    _fail("corrupt.noise_std", c.noise_std, "must be > 0 for the denoising baseline")
  if config.recipe == "deblur" and c.blur in ("mean", "median", "motion") and (c.kernel < 1 or c.kernel % 2 == 0):
    _fail("corrupt.kernel", c.kernel, f"the {c.blur} blur needs a positive odd size")
  if config.recipe == "deblur" and c.blur == "defocus" and c.defocus_radius < 0:
    _fail("corrupt.defocus_radius", c.defocus_radius, "must be >= 0")
  if config.recipe == "deblur" and c.blur == "srad":
    if c.srad_iters < 1:
      _fail("corrupt.srad_iters", c.srad_iters, "must be >= 1")
    if c.srad_dt <= 0:
      _fail("corrupt.srad_dt", c.srad_dt, "must be > 0")
  if config.recipe == "d2mae":
    if c.blur not in ("gaussian", "none"):  # 'none': configs saved before D²MAE said 'gaussian'
      _fail("corrupt.blur", c.blur, "D²MAE blurs with a Gaussian of σ from corrupt.sigma_levels: "
            "expected 'gaussian'")
    try:
      recipes.sigma_levels(c.sigma_levels)
    except ValueError as e:
      _fail("corrupt.sigma_levels", c.sigma_levels,
            f"an empty or malformed range; expected 'start:stop:step' with 0 < start <= stop, step > 0 "
            f"({e})")
  if config.recipe == "usfm":
    if config.model.path != "simmim":
      _fail("model.path", config.model.path, "USFM uses the SimMIM path ('simmim')")
    patch = config.model.patch_size or PRESETS[config.model.variant][3]
    if c.spatial_unit % patch or config.model.image_size % c.spatial_unit:
      _fail("corrupt.spatial_unit", c.spatial_unit,
            f"must be a multiple of the patch size {patch} and divide image_size {config.model.image_size}")
    if not 0.0 <= c.spatial_ratio < 1.0:
      _fail("corrupt.spatial_ratio", c.spatial_ratio, "must lie in [0, 1)")
    if c.frequency:
      try:
        frequency.check_params(frequency.params_from_config(c))
      except ValueError as e:
        raise ValueError(f"config.{e}") from None
    if config.model.ffl_weight < 0:
      _fail("model.ffl_weight", config.model.ffl_weight, "must be >= 0")
  validate_masking(config.model)
  if config.model.blur_embed != "none" and config.recipe != "d2mae":
    _fail("model.blur_embed", config.model.blur_embed, "a blurriness embedding needs recipe='d2mae'")
  if t.batch_size <= 0 or t.batch_size % num_devices:
    _fail("train.batch_size", t.batch_size, f"must be a positive multiple of the device count ({num_devices})")
  if t.batch_size % process_count:
    _fail("train.batch_size", t.batch_size, f"must be a multiple of the process count ({process_count})")
  if t.grad_accum < 0 or (t.grad_accum and t.batch_size % (t.grad_accum * num_devices)):
    _fail("train.grad_accum", t.grad_accum,
          f"batch_size {t.batch_size} must split into grad_accum micro-batches divisible by {num_devices} devices")
  validate_length(t)
  if t.warmup_epochs < 0:
    _fail("train.warmup_epochs", t.warmup_epochs, "must be >= 0")
  if t.base_lr <= 0:
    _fail("train.base_lr", t.base_lr, "must be > 0")
  if t.min_lr < 0:
    _fail("train.min_lr", t.min_lr, "must be >= 0")
  if t.weight_decay < 0:
    _fail("train.weight_decay", t.weight_decay, "must be >= 0")
  for name in ("b1", "b2"):
    if not 0.0 <= t[name] < 1.0:
      _fail(f"train.{name}", t[name], "must lie in [0, 1)")
  if t.grad_clip < 0:
    _fail("train.grad_clip", t.grad_clip, "must be >= 0 (0 = off)")
  if t.max_bad_steps < 1:
    _fail("train.max_bad_steps", t.max_bad_steps, "must be >= 1")
  if t.log_every <= 0:
    _fail("train.log_every", t.log_every, "must be > 0")
  validate_progress(t)
  if t.image_every < 0:
    _fail("train.image_every", t.image_every, "must be >= 0 (0 = no image summaries)")
  if t.checkpoint_every <= 0:
    _fail("train.checkpoint_every", t.checkpoint_every, "must be > 0")
  if t.keep_checkpoints < 1:
    _fail("train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
  if config.seed < 0:
    _fail("seed", config.seed, "must be >= 0")
  validate_data(d)
  if d.sampler not in ("shuffle", "balanced"):
    _fail("data.sampler", d.sampler, "expected 'shuffle' or 'balanced'")
  if not 0.0 < d.crop_scale_min <= 1.0:
    _fail("data.crop_scale_min", d.crop_scale_min, "must lie in (0, 1]")
  if config.mesh.fsdp < 1 or num_devices % config.mesh.fsdp:
    _fail("mesh.fsdp", config.mesh.fsdp, f"must divide the device count ({num_devices})")


def validate_masking(m) -> None:
  """MAE's token masking keeps int(n * (1 - mask_ratio)) of the n patches: at least one must stay
  visible and one be masked (none masked: every loss is NaN; none kept: nothing to encode)."""
  if m.path != "mae":  # the SimMIM path masks by corrupt.spatial_ratio instead
    return
  patch = m.patch_size or PRESETS[m.variant][3]
  n = (m.image_size // patch) ** 2
  kept = masking.num_kept(n, m.mask_ratio)
  if not 1 <= kept < n:
    _fail("model.mask_ratio", m.mask_ratio,
          f"keeps {kept} of the {n} patches of a {m.image_size} px image (patch {patch}): it must leave "
          "at least one patch visible and mask at least one")


def validate_augment(a) -> None:
  """The on-device augmentation's ranges (`config.augment`, mae_jax/corrupt/augment.py)."""
  if a is None or not a.enabled:
    return
  if not 0.0 <= a.rotate_deg <= 180.0:
    _fail("augment.rotate_deg", a.rotate_deg, "must lie in [0, 180] degrees")
  if not 0.0 < a.scale_min <= a.scale_max:
    _fail("augment.scale_min", a.scale_min, f"needs 0 < scale_min <= scale_max ({a.scale_max})")
  if not 0.0 <= a.brightness <= 1.0:
    _fail("augment.brightness", a.brightness, "must lie in [0, 1] (additive, on [0, 1] intensities)")
  if not 0.0 <= a.contrast < 1.0:
    _fail("augment.contrast", a.contrast, "must lie in [0, 1) (factor in [1 - c, 1 + c])")
  if not 0.0 <= a.blur_prob <= 1.0:
    _fail("augment.blur_prob", a.blur_prob, "must lie in [0, 1]")
  if not 0.0 < a.blur_sigma_min <= a.blur_sigma_max:
    _fail("augment.blur_sigma_min", a.blur_sigma_min,
          f"needs 0 < blur_sigma_min <= blur_sigma_max ({a.blur_sigma_max})")


# The dataset task each job builds a folder for (mae_jax/data/sources.py: open_source).
_FOLDER_TASKS = {"pretrain": "pretrain", "finetune": "classify", "linear_probe": "classify",
                 "obs": "classify", "segment": "segment", "enhance": "enhance"}


def validate_folder(config) -> None:
  """A folder dataset's options and the layout mistakes a listing shows (a flat folder given to a
  classification job, an empty class folder), before the workdir or the converted dataset exists."""
  d = config.get("data")
  if d is None or d.get("name") != "folder":
    return
  from mae_jax.data import dicom, folder_scan
  try:
    dicom.parse_frames(d.get("dicom_frames", "all"))
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if d.get("group_by", "study") not in dicom.GROUP_TAGS:
    _fail("data.group_by", d.get("group_by"), "expected 'study' (StudyInstanceUID) or 'patient' (PatientID)")
  if not d.get("folder"):
    _fail("data.folder", d.get("folder"), "is empty: with data.name='folder' it must name a directory of images")
  folder_scan.check_layout(d.folder, _FOLDER_TASKS.get(config.get("job", "pretrain"), "pretrain"))


def validate_length(t) -> None:
  """`train.total_steps` (0: from `train.epochs`) and `train.epochs`: the error names the field
  that was given."""
  if t.total_steps < 0:
    _fail("train.total_steps", t.total_steps, "must be > 0 (or 0: the length comes from train.epochs)")
  if t.get("epochs", 0) < 0:
    _fail("train.epochs", t.epochs, "must be > 0")
  if t.total_steps == 0 and t.get("epochs", 0) == 0:
    _fail("train.epochs", t.get("epochs", 0), "with train.total_steps=0 the length comes from "
          "train.epochs: set train.epochs > 0 or train.total_steps > 0")


def validate_progress(t) -> None:
  """The progress fields of `config.train` every training job has."""
  if t.get("log_every_secs", 60.0) <= 0:
    _fail("train.log_every_secs", t.log_every_secs, "must be > 0 (seconds)")
  if t.get("profile_steps", 0) < 0:
    _fail("train.profile_steps", t.profile_steps, "must be >= 0 (0 = no profile)")


def checkpoint_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps in `workdir`/checkpoints. orbax writes a step into a temporary
  directory and renames it on commit, so a step directory killed half-way is never listed."""
  path = os.path.join(os.path.expanduser(workdir), "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def validate_transfer(config, field: str = "init_from") -> None:
  """`config.init_from` (a pretraining workdir) holds a saved config and a committed checkpoint.

  Downstream jobs call this before building anything; an empty `init_from` (train from scratch)
  passes when the config allows it (the job decides)."""
  src = config.get(field, None)
  if not src:
    return
  path = os.path.expanduser(str(src))
  if not os.path.isdir(path):
    _fail(field, src, "is not a directory (expected a pretraining workdir)")
  if not os.path.exists(os.path.join(path, "config.json")):
    _fail(field, src, "holds no config.json: is it a mae_jax pretraining workdir?")
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      job = json.load(f).get("job", "pretrain")
  except (OSError, ValueError, AttributeError) as e:
    _fail(field, src, f"its config.json cannot be read ({type(e).__name__}: {e})")
  if job != "pretrain":
    _fail(field, src, f"holds a {job!r} job, not a pretraining run: set it to the pretraining workdir "
          "that job started from")
  if not checkpoint_steps(path):
    _fail(field, src, f"holds no complete checkpoint (looked in {os.path.join(path, 'checkpoints')})")
