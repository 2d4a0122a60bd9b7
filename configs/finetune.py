"""Fine-tuning (and, with `probe`, linear probing) from a pretraining workdir (SPEC §5).

The encoder, the recipe, the transfer blur, the D²MAE σ levels and token, and the normalisation
all come from the `config.json` of `init_from`; this file only holds the downstream recipe.

Published setting (MAE fine-tuning, which D²MAE and Deblurring MAE follow; batch 32 as D²MAE's
downstream runs): AdamW (0.9, 0.999), wd 0.05 (not on 1-D params, pos_embed, cls_token), base lr
5e-4 × batch/256, 100 epochs with 5 warm-up then cosine to 1e-6, layer-wise decay 0.65 for ViT-B
(0.75 otherwise; `train.layer_decay` unset = by the pretrained variant), drop path 0.1, label
smoothing 0.1, global average pool + fc_norm. Mixup 0.8 / cutmix 1.0 with `mixup` (off by default:
a lesion can be cut out of an ultrasound image). Best validation macro-F1 is evaluated on test.

ARGS: init_from=DIR, fraction=0.2 (label efficiency), seed=N, probe (→ linear probe), mixup,
pool=avg|token, obs=none|fixed|search, step=S, fixed_sigma=σ (D²MAE; default: the pretraining
config's `obs`), epochs=N, smoke.

  python -m mae_jax.main --config=configs/finetune.py:init_from=PRE --workdir=FT
  python -m mae_jax.main --config=configs/finetune.py:smoke,init_from=PRE --workdir=FT
  python -m mae_jax.main --config=configs/finetune.py:init_from=PRE,fraction=0.2,seed=1 --workdir=FT
  python -m mae_jax.main --config=configs/finetune.py:init_from=PRE,obs=fixed,fixed_sigma=0.5 --workdir=FT
"""

import ml_collections
from ml_collections import config_dict

from mae_jax import config_base


def downstream(args) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "linear_probe" if args.probe else "finetune"
  c.init_from = args.init_from  # a pretraining workdir
  c.init_step = config_dict.placeholder(int)  # None: its latest checkpoint
  c.seed = args.seed
  c.label_fraction = args.fraction  # stratified subset of the training labels (evaluate.stratified_subset)

  # The same data fields as pretraining (see config_base.base); classification uses `label`.
  c.data = config_base.base(config_base.parse_arg("smoke" if args.smoke else "")).data
  c.data.crop_scale_min = 0.08  # MAE fine-tuning / linear probing: RandomResizedCrop(scale=(0.08, 1))
  c.data.sampler = "shuffle"

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 0  # 0: from the dataset's class names / labels
  c.model.global_pool = args.pool  # avg (MAE fine-tuning) | token (CLS after the final norm)
  c.model.drop_path = 0.1

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global
  c.train.eval_batch_size = 0  # 0: batch_size
  c.train.epochs = 100
  c.train.total_steps = 0  # 0: from epochs
  c.train.warmup_epochs = 5
  c.train.base_lr = 5e-4  # lr = base_lr * batch / 256
  c.train.min_lr = 1e-6
  c.train.weight_decay = 0.05
  c.train.layer_decay = config_dict.placeholder(float)  # None: 0.65 for ViT-B, 0.75 otherwise
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.grad_clip = 0.0
  c.train.label_smoothing = 0.1
  c.train.mixup = 0.8 if args.mixup else 0.0  # Beta(α, α); 0 = off
  c.train.cutmix = 1.0 if args.mixup else 0.0
  c.train.mixup_prob = 1.0
  c.train.mixup_switch_prob = 0.5
  c.train.max_bad_steps = 10
  c.train.log_every = 50
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
  c.eval.n_boot = 1000  # bootstrap resamples of the test set for the 95% CI
  c.eval.alpha = 0.05

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1

  if args.probe:
    # MAE main_linprobe.py: LARS, base lr 0.1, batch 16384, 90 epochs (10 warm-up), no weight decay,
    # no label smoothing, no mixup, no drop path.
    c.train.batch_size = 256
    c.train.base_lr = 0.1
    c.train.epochs = 90
    c.train.warmup_epochs = 10
    c.train.weight_decay = 0.0
    c.train.label_smoothing = 0.0
    c.model.drop_path = 0.0
    c.model.global_pool = "token"
  if args.epochs:
    c.train.epochs = args.epochs
  if args.smoke:
    smoke(c, probe=args.probe)
  return c


def smoke(c, probe: bool = False) -> None:
  """About a minute on 2 CPU cores from a smoke pretraining workdir (32 px, micro ViT)."""
  # No crop: at 32 px a crop easily loses the few pixels that make a lesion malignant.
  c.data.crop_scale_min = 1.0
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.epochs = 30
  c.train.warmup_epochs = 1
  c.train.base_lr = 0.5 if probe else 5e-2
  c.train.log_every = 40
  c.obs.batch_size = 64
  c.eval.n_boot = 200


def get_config(arg=None):
  args = config_base.parse_arg(arg, init_from="", fraction=1.0, seed=0, probe=False, mixup=False,
                               pool="avg", obs="", step=0, fixed_sigma=0.0, epochs=0)
  return downstream(args)
