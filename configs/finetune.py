"""Fine-tuning (and, with `probe`, linear probing) from a pretraining workdir (docs/methods.md#downstream).

The encoder, the recipe, the transfer blur, the D²MAE σ levels and token, and the normalisation
all come from the `config.json` of `init_from`; this file only holds the downstream recipe.

Published setting (MAE fine-tuning, which D²MAE and Deblurring MAE follow; batch 32 as D²MAE's
downstream runs): AdamW (0.9, 0.999), wd 0.05 (not on 1-D params, pos_embed, cls_token), base lr
5e-4 × batch/256, 100 epochs with 5 warm-up then cosine to 1e-6, layer-wise decay 0.65 for ViT-B
(0.75 otherwise; `train.layer_decay` unset = by the pretrained variant), drop path 0.1, label
smoothing 0.1, global average pool + fc_norm. Mixup 0.8 / cutmix 1.0 with `mixup` (off by default:
a lesion can be cut out of an ultrasound image). Best validation macro-F1 (validated every epoch)
is evaluated on test.

Per-paper presets (`paper=`, docs/methods.md#presets; the values land in config.json):
  d2mae (default): the setting above, batch 32, best epoch by validation macro-F1.
  deblur: Deblurring MAE's tables: fine-tune batch 256, linear probe batch 1024, best epoch by
    validation accuracy (DeblurringMIM keeps the best `acc1`), F1 also as the positive class's F1
    on binary tasks (`f1_positive`); fine-tuning as openmedlab/DeblurringMIM main_finetune.py runs:
    base lr 1e-3, plain AdamW (weight decay 0.01 on every parameter, no layer decay), 5 warm-up
    epochs then a cosine over 10^7 epochs (constant), early stopping 200 epochs after the best,
    random erasing 0.25 (on device), label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1 (host
    pipeline); evaluation images resized to 256 (shorter side) and centre-cropped to 224.
  usfm: openmedlab/USFM configs/experiment/task/Cls.yaml + baseconfig.yaml + configs/model/Cls/vit.yaml
    as usdsgen/ runs them: 200 epochs, batch 64, 20 warm-up epochs, base lr 1.25e-3 · B/512
    (usdsgen/trainer/basetrainer.py scales by 512), timm CosineLRScheduler over all steps with
    warm-up from 2.5e-4 · B/512, min lr 2.5e-7 · B/512, weight decay 0.05 (not on 1-D, biases,
    pos_embed, cls_token), layer decay 0.65, label smoothing 0.1, grad clip 5, drop path 0.1, AdamW
    (0.9, 0.999), mean pooling; training images only resized; the kept epoch is the best validation
    balanced accuracy, validated every 5 epochs.
  ViT-L/H follow MAE's fine-tuning recipe with any preset: drop path 0.2 (L) / 0.3 (H), base lr 1e-3,
  50 epochs (MAE Table 9 / FINETUNE.md).

ARGS: init_from=DIR, fraction=0.2 (label efficiency), seed=N, probe (→ linear probe), mixup, paper=d2mae|deblur|usfm,
pool=avg|token (default avg; token with probe), obs=none|fixed|search, step=S, fixed_sigma=σ (D²MAE; default: the pretraining
config's `obs`), epochs=N, smoke.

  python -m mae_jax.main --config=configs/finetune.py:init_from=PRE --workdir=FT
  python -m mae_jax.main --config=configs/finetune.py:smoke,init_from=PRE --workdir=FT
  python -m mae_jax.main --config=configs/finetune.py:init_from=PRE,fraction=0.2,seed=1 --workdir=FT
  python -m mae_jax.main --config=configs/finetune.py:init_from=PRE,obs=fixed,fixed_sigma=0.5 --workdir=FT
"""

import ml_collections

from mae_jax import config_base


def downstream(args) -> ml_collections.ConfigDict:
  c = config_base.downstream(args, "linear_probe" if args.probe else "finetune")
  c.data.crop_scale_min = 0.08  # MAE fine-tuning / linear probing: RandomResizedCrop(scale=(0.08, 1))

  # avg (MAE fine-tuning: mean patch token -> fc_norm) | token (CLS after the final norm, MAE's linear
  # probing default; `pool=avg` probes as main_linprobe.py --global_pool).
  c.model.global_pool = args.pool or ("token" if args.probe else "avg")
  c.model.drop_path = 0.1

  c.train.batch_size = 32  # global
  c.train.epochs = 100
  c.train.warmup_epochs = 5
  c.train.base_lr = 5e-4  # lr = base_lr * batch / 256
  c.train.label_smoothing = 0.1
  c.train.mixup = 0.8 if args.mixup else 0.0  # Beta(α, α); 0 = off
  c.train.cutmix = 1.0 if args.mixup else 0.0
  c.train.mixup_prob = 1.0
  c.train.mixup_switch_prob = 0.5
  c.train.randaugment = ""  # timm RandAugment string on the host, e.g. 'rand-m9-mstd0.5-inc1'; '' = off
  c.train.random_erasing = 0.0  # timm RandomErasing probability (mode 'pixel', one box)
  # Evaluation images: 0 = the whole image resized to S x S; in (0, 1]: shorter side to
  # int(S / eval_crop_pct), then the centre S x S (mae_jax/data/transforms.py).
  c.data.eval_crop_pct = 0.0
  common_fields(c)

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
  apply_paper(c, c.paper, probe=args.probe, variant=args.variant)
  if args.smoke:
    smoke(c, probe=args.probe)
  if args.epochs:  # after smoke: `smoke,epochs=5` means 5 epochs of the smoke run
    c.train.epochs = args.epochs
  return c


def common_fields(c) -> None:
  """Protocol fields fine-tuning and segmentation share, at the MAE / D²MAE values; `paper=` presets
  change them (docs/methods.md#presets)."""
  c.eval.every_epochs = 1  # validate after epochs 1, 1 + k, 1 + 2k, ... (USFM: (epoch − 1) % 5 == 0)
  # warmup_cosine: linear warm-up from 0 then half-cosine over the rest (MAE's lr_sched);
  # timm_cosine: timm CosineLRScheduler as USFM runs it (cosine over all steps, warm-up included,
  # warm-up from train.warmup_lr, stepped after each update).
  c.train.schedule = "warmup_cosine"
  c.train.warmup_lr = 0.0  # timm_cosine's warm-up start (absolute)
  c.train.decay_epochs = 0  # length of the cosine in epochs; 0: train.epochs
  c.train.early_stop_epochs = 0  # stop after this many epochs without a better validation score; 0: off
  # Which parameters AdamW does not decay: mae (1-D, pos_embed, cls_token, blur_token and BEiT's
  # relative-position tables), usfm (1-D, biases, pos_embed, cls_token: USFM's no_weight_decay; the
  # relative-position tables are decayed), none (every parameter, a plain torch AdamW).
  c.train.no_decay = "mae"


def apply_paper(c, paper: str, *, probe: bool, variant: str) -> None:
  """The downstream protocol of `paper` (module docstring) over the MAE / D²MAE defaults."""
  c.train.lr_batch_base = 256  # lr = base_lr · batch / lr_batch_base
  if paper == "deblur":
    c.train.batch_size = 1024 if probe else 256
    c.eval.select = "accuracy"
    c.eval.f1 = "positive"
    # DeblurringMIM util/datasets.py: evaluation Resize(256, bicubic) + CenterCrop(224) at input 224
    # (timm crop_pct 224/256; it uses 1.0 above 224).
    c.data.eval_crop_pct = 224 / 256
  if paper == "deblur" and not probe:
    # openmedlab/DeblurringMIM main_finetune.py as it runs: blr 1e-3; `torch.optim.AdamW(
    # model.parameters(), lr)` — the layer-decay groups are commented out, so no layer decay and
    # torch's default weight decay 0.01 on every parameter (--weight_decay 0.05 is never passed);
    # warm-up 5 epochs, then cosine over --epochs 10,000,000 (a constant lr in practice); early
    # stopping 200 epochs after the best validation acc1; label smoothing 0.1, drop path 0.1, no
    # mixup, no grad clipping; timm create_transform: RandomResizedCrop(0.08–1) bicubic + flip +
    # RandAugment rand-m9-mstd0.5-inc1 (main_finetune.py --aa default; host pipeline) +
    # RandomErasing(0.25, pixel; on device).
    c.train.base_lr = 1e-3
    c.train.layer_decay = 1.0
    c.train.weight_decay = 0.01
    c.train.no_decay = "none"
    c.train.epochs = 1000  # a cap: the run ends by early stopping (main_finetune.py: 10,000,000)
    c.train.decay_epochs = 10_000_000
    c.train.early_stop_epochs = 200
    c.train.min_lr = 1e-6
    c.train.warmup_epochs = 5
    c.train.label_smoothing = 0.1
    c.train.grad_clip = 0.0
    c.train.randaugment = "rand-m9-mstd0.5-inc1"
    c.train.random_erasing = 0.25
    c.model.drop_path = 0.1
    c.model.global_pool = "avg"
  elif paper == "usfm" and not probe:
    c.train.epochs = 200
    c.train.batch_size = 64
    c.train.warmup_epochs = 20
    c.train.base_lr = 1.25e-3
    c.train.lr_batch_base = 512
    c.train.min_lr = 2.5e-7 * 64 / 512  # USFM scales min_lr by B/512 too; absolute here
    c.train.schedule = "timm_cosine"
    c.train.warmup_lr = 2.5e-4 * 64 / 512  # Cls.yaml warmup_lr, scaled by B/512 as base_lr
    c.train.weight_decay = 0.05
    c.train.no_decay = "usfm"
    c.train.layer_decay = 0.65
    c.train.label_smoothing = 0.1  # configs/model/Cls/vit.yaml (baseconfig.yaml's 0 is overridden)
    c.train.grad_clip = 5.0
    c.model.drop_path = 0.1
    c.model.global_pool = "avg"
    # usdsgen/trainer/cls_trainer.py keeps the epoch with the best validation balanced accuracy
    # (sklearn balanced_accuracy_score), validated when epoch % val_freq == 0 (0-based; val_freq 5).
    c.eval.select = "balanced_accuracy"
    c.eval.every_epochs = 5
    # usdsgen/data/datasets.py build_cls_dataset: training images are only resized to 224 (bicubic);
    # a crop of scale 1 is the whole (square) image, and no flip.
    c.data.crop_scale_min = 1.0
    c.data.hflip = False
  elif paper == "usfm":
    c.train.batch_size = 64  # USFM publishes no linear probe: its batch, MAE's probe otherwise
  if variant in ("l", "h") and not probe:  # MAE's own ViT-L/H fine-tuning
    c.model.drop_path = 0.2 if variant == "l" else 0.3
    c.train.base_lr = 1e-3
    c.train.epochs = 50
    c.train.lr_batch_base = 256


def smoke(c, probe: bool = False) -> None:
  """About a minute on 2 CPU cores from a smoke pretraining workdir (32 px, micro ViT)."""
  config_base.downstream_smoke(c)
  c.train.batch_size = 32
  c.train.epochs = 30
  # LARS scales each matrix's step by trust_coefficient (0.001) x |w|/|g|: the weights move by ~lr/1000
  # of their norm per step. MAE's probe (peak lr 6.4, 7,000 steps) moves them far; a smoke run's 240
  # steps need a larger peak lr (base 40 at batch 32: 5), or only the bias learns: the majority class.
  c.train.base_lr = 40.0 if probe else 5e-2
  c.train.log_every = 40


def get_config(arg=None):
  args = config_base.parse_arg(arg, **config_base.DOWNSTREAM_ARGS, probe=False, mixup=False, pool="")
  return downstream(args)
