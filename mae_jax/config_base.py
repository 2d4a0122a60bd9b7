"""The fields every config shares, and the parser for `--config=configs/NAME.py:ARGS`.

A config file is a table of one paper's setting: it starts from `base()` and changes only what its
recipe changes. ARGS is a comma list of words and key=value pairs, e.g. `b`, `smoke`,
`l,blur=srad`, `smoke,range=0.1:1.6`. A word that is a model size picks the size; `smoke` picks a
tiny model on small images that trains in about a minute on 2 CPU cores (for tests); `demo` builds
on it: a small model that learns visibly in at most five minutes on 2 CPU cores (a first figure).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mae_jax.presets import PRESETS

MODEL_SIZES = ("ti", "s", "b", "l", "h")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`'b,smoke,blur=srad'` -> {variant: 'b', smoke: True, blur: 'srad', ...defaults}.

  Unknown keys are errors, so a typo in ARGS cannot silently fall back to a default.
  """
  out = dict(defaults)
  out.setdefault("variant", "b")
  out.setdefault("smoke", False)
  out.setdefault("demo", False)
  for item in filter(None, (arg or "").split(",")):
    if "=" in item:
      key, value = item.split("=", 1)
    elif item in PRESETS:
      key, value = "variant", item
    else:
      key, value = item, True
    if key not in out:
      import difflib
      close = difflib.get_close_matches(key, list(out), n=2)
      raise ValueError(f"config argument {key!r} is not known"
                       + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
                       + f"; this config takes {sorted(out)}")
    default = out[key]
    if isinstance(default, bool) and isinstance(value, str):
      value = value.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
      value = type(default)(value)
    out[key] = value
  if out["demo"]:  # the demo edits the smoke settings (`demo`), so every `args.smoke` branch applies
    out["smoke"] = True
  return ml_collections.ConfigDict(out)


def base(args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Plain MAE as published (He et al. 2022, Table 8 / A.1): the baseline every recipe edits."""
  c = ml_collections.ConfigDict()
  c.recipe = "mae"  # mae | deblur | denoise | d2mae | usfm
  c.job = "pretrain"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.path = "mae"  # mae: visible tokens + transformer decoder; simmim: all tokens + linear decoder
  c.model.variant = args.variant
  c.model.patch_size = 0  # 0: the preset's patch size (16, or 14 for ViT-H)
  c.model.image_size = 224
  c.model.in_chans = 1  # ultrasound is grayscale
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16
  c.model.mask_ratio = 0.75
  c.model.norm_pix_loss = True
  c.model.loss_on = "masked"  # masked | all
  c.model.blur_embed = "none"  # D²MAE: none | token | add
  c.model.ffl_weight = 0.4  # USFM λ
  c.model.ffl_alpha = 1.0
  # Encoder: vit (MAE's ViT, fixed sin-cos positions) | beit (USFM's released backbone: relative
  # position bias, layer scale, q/v bias; mae_jax/models/beit.py).
  c.model.backbone = "vit"
  c.model.layer_scale = 0.1  # beit: layer scale init (USFM configs/model/Cls/vit.yaml init_values)
  c.model.shared_rel_pos = True  # beit pretraining: one relative table for all blocks (downstream: per block)
  c.model.dtype = "auto"  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU. Params stay float32.
  c.model.attention = "xla"  # jax.nn.dot_product_attention implementation: xla (any backend) | cudnn (GPU)
  c.model.remat = "none"  # none | full | a jax.checkpoint_policies name: recompute block activations
  c.model.scan_layers = False  # blocks stacked and run under nnx.scan (compile time flat in depth)

  # What happens to pixels inside the step, before normalisation (docs/methods.md#blur-strength).
  c.corrupt = ml_collections.ConfigDict()
  c.corrupt.blur = "none"  # none | gaussian | srad | mean | median | motion | defocus
  c.corrupt.sigma = 1.1  # fixed Gaussian σ (Deblurring MAE)
  # native: σ (and D²MAE's σ_t, OBS's σ*) in the stored image's pixels, as DeblurringMIM blurs before
  # the random resized crop; the device blurs with σ·zoom per axis. model: σ in model pixels.
  c.corrupt.sigma_units = "native"
  # Mean / median / motion / defocus sizes: 'native' = stored pixels (as the Gaussian's σ; the paper
  # blurs the stored images), 'model' = model pixels after crop and resize (before issue 26).
  c.corrupt.kernel_units = "native"
  c.corrupt.sigma_levels = ""  # D²MAE "start:stop:step", e.g. "0.1:1.1:0.1"; empty = fixed σ
  c.corrupt.kernel = 5  # mean/median/motion length
  c.corrupt.defocus_radius = 5
  c.corrupt.srad_iters = 40
  c.corrupt.srad_dt = 0.1
  c.corrupt.noise_std = 0.0  # denoising-MAE baseline
  c.corrupt.spatial_ratio = 0.4  # USFM spatial mean masking
  c.corrupt.spatial_unit = 32
  c.corrupt.frequency = True  # USFM band-stop masking (False = USFM-woF)
  # USFM's Frequency_MASK fields (CenterProtect, BaseBW, IncreaseFactor, MaxIncrease, Ratio), in
  # spectrum bins; the project's reading of §4.2 (mae_jax/corrupt/frequency.py, docs/methods.md#usfm).
  c.corrupt.freq_center_protect = 5
  c.corrupt.freq_base_bw = 8
  c.corrupt.freq_increase_factor = 0.5
  c.corrupt.freq_max_increase = 32
  c.corrupt.freq_ratio = 0.3

  # On-device augmentation of the clean image before the corruption (USFM §3.1: rotation, scaling,
  # brightness, contrast, Gaussian blur; cropping is the host's random resized crop). Off here; on in
  # configs/usfm.py. The pretraining loss compares with the augmented image.
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = False
  c.augment.rotate_deg = 10.0  # angle ~ U(-a, a) degrees, about the image centre
  c.augment.scale_min = 0.9  # isotropic scale ~ U(scale_min, scale_max), about the centre
  c.augment.scale_max = 1.1
  c.augment.brightness = 0.1  # additive delta ~ U(-b, b) (dm_pix.adjust_brightness)
  c.augment.contrast = 0.1  # factor ~ U(1 - c, 1 + c) about the image mean (dm_pix.adjust_contrast)
  c.augment.blur_prob = 0.5  # probability of a Gaussian blur per image
  c.augment.blur_sigma_min = 0.1  # its σ ~ U(min, max), model pixels
  c.augment.blur_sigma_max = 2.0

  c.data = ml_collections.ConfigDict()
  c.data.name = "us_phantom"  # us_phantom | folder
  c.data.data_dir = ""  # where built datasets live; "" = $MAE_JAX_DATA or ~/.cache/mae_jax/datasets
  c.data.folder = ""  # with name=folder: a tree of images whose first-level folders are organs/classes
  c.data.dicom_frames = "all"  # folder DICOM cines: all | first | every:K (frames 0, K, 2K, ...)
  c.data.group_by = "study"  # folder DICOM groups for the split: study (StudyInstanceUID) | patient (PatientID)
  c.data.num_train = 2000
  c.data.num_validation = 200
  c.data.num_test = 200
  c.data.native_size = 256
  c.data.seed = 0
  c.data.sampler = "shuffle"  # shuffle | balanced (USFM organ-balanced)
  c.data.crop_scale_min = 0.2
  c.data.hflip = True
  c.data.mean = config_dict.placeholder(float)  # None: measured on the training split
  c.data.std = config_dict.placeholder(float)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4096  # global
  # Micro-batches per step: the same effective batch on a smaller machine. 0 = automatic: the whole
  # batch at once on GPU/TPU, micro-batches of at most `cpu_micro_batch` per device on CPU, so the
  # published batch (e.g. 1024 for D²MAE) runs as is on a laptop, only slowly.
  c.train.grad_accum = 0
  c.train.cpu_micro_batch = 32
  c.train.epochs = 800
  c.train.total_steps = 0  # 0: from epochs
  c.train.warmup_epochs = 40.0
  c.train.base_lr = 1.5e-4  # lr = base_lr * batch / 256
  c.train.min_lr = 0.0
  c.train.weight_decay = 0.05
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 0.0  # 0 = off (MAE pretraining does not clip)
  c.train.max_bad_steps = 10  # consecutive non-finite steps before the run stops
  c.train.log_every = 50
  c.train.log_every_secs = 60.0  # a metrics and a progress line at least this often, however slow the steps
  c.train.profile_steps = 0  # > 0: a profiler trace of that many steps from step 10 (TensorBoard's profile tab)
  c.train.image_every = 1000
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1  # devices over which parameters and optimizer state are sharded
  c.mesh.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated under fsdp

  if args.smoke:
    smoke(c)
  if args.get("demo"):
    demo(c)
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """A tiny model on small images: a minute on 2 CPU cores, for CI and first contact."""
  c.model.variant = "micro"
  c.model.image_size = 32
  c.model.patch_size = 8
  c.model.decoder_width = 32
  c.model.decoder_depth = 1
  c.model.decoder_heads = 2
  c.data.num_train = 256
  c.data.num_validation = 64
  c.data.num_test = 64
  c.data.native_size = 64
  c.corrupt.spatial_unit = 16
  c.train.batch_size = 32
  c.train.total_steps = 60
  c.train.warmup_epochs = 1.0
  c.train.base_lr = 1.5e-3
  c.train.log_every = 10
  c.train.image_every = 30
  c.train.checkpoint_every = 30


def demo(c: ml_collections.ConfigDict) -> None:
  """On top of `smoke`: a model that learns visibly in at most five minutes on 2 CPU cores, for the
  first figure (README "Figures", notebooks/reconstruction.ipynb). Small patches on small images, a
  few hundred steps at a high learning rate, no random crop (the held-out images are whole), and at
  the end the masked-patch error on held-out images against filling each masked patch with the mean
  of the visible pixels (`mae_jax/recon_quality.py`). Measured: docs/figures.md#the-demo."""
  c.model.variant = "tiny"
  c.model.image_size = 32
  c.model.patch_size = 4
  c.model.decoder_width = 64
  c.model.decoder_depth = 2
  c.model.decoder_heads = 4
  c.data.num_train = 2000
  c.data.num_validation = 200
  c.data.native_size = 64
  c.data.crop_scale_min = 1.0
  c.train.batch_size = 64
  c.train.cpu_micro_batch = 64  # the whole batch at once: a small model, no need to accumulate
  c.train.total_steps = 600
  c.train.warmup_epochs = 2.0
  c.train.base_lr = 6e-3
  c.train.log_every = 100
  c.train.image_every = 0
  c.train.checkpoint_every = 1000
  c.train.recon_eval_images = 64  # held-out images scored at the end of the run (0: none)


# ------------------------------------------------------------------------------------ downstream

# ARGS every downstream config takes: the pretraining workdir, label efficiency, the seed, D²MAE's
# optimal blurriness search (unset: the pretraining config's `obs`) and the number of epochs.
DOWNSTREAM_ARGS = dict(init_from="", fraction=1.0, seed=0, obs="", step=0, fixed_sigma=0.0, epochs=0,
                       paper="", scratch="")
# `paper=`: whose downstream protocol a job follows (docs/methods.md#presets); d2mae = the defaults.
PAPERS = ("d2mae", "deblur", "usfm")


def downstream(args: ml_collections.ConfigDict, job: str) -> ml_collections.ConfigDict:
  """The fields fine-tuning, linear probing and segmentation share (`train/downstream.py` reads
  them), with the values they share. The encoder, the recipe and the normalisation are not here:
  they come from the pretraining workdir `init_from`. Each config file adds its model and loss, and
  sets `train.batch_size`, `train.epochs`, `train.warmup_epochs`, its peak lr and
  `data.crop_scale_min` to its published values."""
  c = ml_collections.ConfigDict()
  c.job = job
  paper = args.get("paper") or "d2mae"
  if paper not in PAPERS:
    raise ValueError(f"config argument paper={paper!r}: expected one of {PAPERS}")
  c.paper = paper  # the preset the config file applied (recorded in config.json)
  c.init_from = args.init_from  # a pretraining workdir
  # Baselines without pretraining: `scratch=NAME` trains the encoder of configs/NAME.py from its random
  # init (init_from stays empty); scratch_args are that config's ARGS (smoke for smoke runs).
  c.scratch = args.get("scratch") or ""
  c.scratch_args = "smoke" if args.smoke else ""
  c.init_step = config_dict.placeholder(int)  # None: its latest checkpoint
  c.seed = args.seed
  c.label_fraction = args.fraction  # stratified subset of the training split (evaluate.stratified_subset)

  # The same data fields as pretraining (see base).
  c.data = base(parse_arg("smoke" if args.smoke else "")).data
  c.data.sampler = "shuffle"

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 0  # 0: from the data (class names / labels, or the mask values)
  # How the encoder's blocks run downstream (vit.downstream_spec); None: as in pretraining.
  c.model.attention = config_dict.placeholder(str)  # xla | cudnn
  c.model.remat = config_dict.placeholder(str)  # none | full | a jax.checkpoint_policies name
  c.model.scan_layers = config_dict.placeholder(bool)

  c.train = ml_collections.ConfigDict()
  c.train.eval_batch_size = 0  # 0: batch_size
  c.train.total_steps = 0  # 0: from epochs
  c.train.min_lr = 1e-6
  c.train.weight_decay = 0.05
  c.train.layer_decay = config_dict.placeholder(float)  # None: 0.65 for ViT-B, 0.75 otherwise
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.grad_clip = 0.0
  c.train.max_bad_steps = 10
  c.train.log_every = 50
  c.train.log_every_secs = 60.0
  c.train.profile_steps = 0
  c.train.keep_checkpoints = 1

  # D²MAE optimal blurriness search; unset fields come from the pretraining config's `obs`.
  c.obs = ml_collections.ConfigDict()
  c.obs.mode = config_dict.placeholder(str)  # none | fixed | search
  c.obs.step = config_dict.placeholder(int)  # search step s
  c.obs.fixed_sigma = config_dict.placeholder(float)
  c.obs.batch_size = 64  # images per OBS batch (× number of searched levels through the model)
  if args.obs:
    c.obs.mode = args.obs
  if args.step:
    c.obs.step = args.step
  if args.fixed_sigma:
    c.obs.fixed_sigma = args.fixed_sigma

  c.eval = ml_collections.ConfigDict()
  c.eval.select = "macro_f1"  # classification: validation metric that picks the best epoch (or accuracy)
  c.eval.f1 = "macro"  # classification: 'positive' adds the F1 of class 1 on binary tasks
  c.eval.n_boot = 1000  # bootstrap resamples of the test images for the 95% CI
  c.eval.alpha = 0.05

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1
  return c


def downstream_smoke(c: ml_collections.ConfigDict) -> None:
  """What every downstream smoke config shares (on the smoke dataset fields, from `base`)."""
  # No crop: at 32 px a crop easily cuts away the few pixels that decide a label or hold a lesion.
  c.data.crop_scale_min = 1.0
  c.train.eval_batch_size = 64
  c.train.warmup_epochs = 1
  c.obs.batch_size = 64
  c.eval.n_boot = 200
