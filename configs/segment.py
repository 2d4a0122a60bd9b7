"""Segmentation fine-tuning: UperNet on the pretrained ViT (USFM §4.1.2; docs/methods.md#downstream), from any
pretraining workdir of any recipe. The encoder, the recipe (transfer blur, D²MAE σ* and token) and
the normalisation come from `init_from`'s config.json.

Published setting. USFM §4.1.2 / §4.2: ViT-B, UperNet as suggested by BEiT on the features of blocks
3, 5, 7, 11 (1-based), "200 epochs using the Adam optimizer with a cosine learning rate adjustment
strategy" — USFM states its schedule, so we take 200 epochs rather than BEiT's 160k iterations.
What USFM does not state comes from the BEiT / MAE UperNet recipe in mmseg
(`upernet_mae-base_fp16_8x2_512x512_160k_ade20k`): batch 16, AdamW (0.9, 0.999), lr 1e-4 (absolute),
weight decay 0.05, layer-wise decay 0.65 (ViT-B; 0.75 otherwise), drop path 0.1, linear warm-up
(1500 of 160k iterations ≈ 1 %: we warm up for 2 of 200 epochs), UperNet with 512 channels, pool
scales 1, 2, 3, 6, dropout 0.1. We use GroupNorm where mmseg uses SyncBN (see
`mae_jax/models/upernet.py`), no auxiliary FCN head, and warm-up + half-cosine to 1e-6 (mmseg: poly).
Loss: cross-entropy + soft Dice (batch Dice, see `train.dice_batch`), weights 1 and 1. Input 224 px =
the pretraining size (`model.image_size` segments at another size, resizing the position table).

Per-paper presets (`paper=`): d2mae / deblur (default): the setting above. usfm: openmedlab/USFM
configs/experiment/task/Seg.yaml + baseconfig.yaml + configs/model/Seg/Upernet.yaml as usdsgen/ runs them:
batch 64, 400 epochs, 20 warm-up, lr 3e-4 · 64/512 (basetrainer.py scales by 512) to 0 with timm's
CosineLRScheduler (warm-up from 5e-5 · 64/512), plain AdamW with weight decay 0.05 on every parameter
and no layer decay (usdsgen/utils/optimizer.py groups only swin / vit models), grad clip 5, drop path
0.1, UperNet channels 768, cross-entropy only with the auxiliary FCN head (weight 0.4), features
after 0-based blocks 3, 5, 7, 11; training images resized, RandomRotate90 and horizontal and vertical
flips (p = 0.5 each); validated every 5 epochs, the best validation Dice kept.

ARGS: init_from=DIR, fraction=0.2 (label efficiency), seed=N, obs=none|fixed|search, step=S, paper=d2mae|deblur|usfm,
fixed_sigma=σ (D²MAE; default: the pretraining config's `obs`), epochs=N, smoke.

  python -m mae_jax.main --config=configs/segment.py:init_from=PRE --workdir=SEG
  python -m mae_jax.main --config=configs/segment.py:smoke,init_from=PRE --workdir=SEG
  python -m mae_jax.main --config=configs/segment.py:init_from=PRE,fraction=0.2,seed=1 --workdir=SEG
  # a folder of BUSI-style name.png + name_mask.png pairs (or images/ + masks/):
  python -m mae_jax.main --config=configs/segment.py:init_from=PRE --workdir=SEG \
      --config.data.name=folder --config.data.folder=/data/BUSI
"""

import os

from mae_jax import config_base, config_files

# The protocol fields fine-tuning and segmentation share are set in configs/finetune.py.
finetune_config = config_files.load_module(os.path.join(os.path.dirname(__file__), "finetune.py"))


def get_config(arg=None):
  args = config_base.parse_arg(arg, **config_base.DOWNSTREAM_ARGS)
  c = config_base.downstream(args, "segment")
  c.data.crop_scale_min = 0.5  # RandomResizedCrop(scale=(0.5, 1)) on image and mask; 1.0 = none
  c.data.interpolation = "bicubic"  # image resampling (bicubic | bilinear); masks: nearest

  c.model.image_size = 0  # 0: the pretraining size; else the position table is resized (bicubic)
  c.model.blocks = ""  # 1-based encoder blocks, e.g. "3,5,7,11"; "" = USFM's, scaled to the depth
  c.model.channels = 512  # UperNet width (mmseg: 512)
  c.model.pool_scales = "1,2,3,6"
  c.model.norm_groups = 32  # GroupNorm groups (gcd with the channel count)
  c.model.drop_path = 0.1
  c.model.dropout = 0.1  # channel dropout before the classifier
  c.model.aux_channels = 0  # USFM's auxiliary FCN head on the stride-16 level (0 = none; USFM: 256)

  c.train.batch_size = 16  # global
  c.train.epochs = 200
  c.train.warmup_epochs = 2
  c.train.lr = 1e-4  # peak lr, absolute (not scaled by the batch, as mmseg)
  c.train.ce_weight = 1.0
  c.train.dice_weight = 1.0
  c.train.aux_weight = 0.4  # the auxiliary head's cross-entropy weight, when it exists
  c.train.dice_smooth = 1.0
  # One soft Dice per class over all pixels of the batch (nnU-Net's batch Dice, its 2-D default), not
  # one per image: a per-image Dice costs ≈ Σp on every lesion-free image, which drives the lesion
  # probability to zero before lesions are learnt (smoke run: no lesion pixel predicted after 640
  # steps with per-image Dice; from step ~130 with batch Dice). False: per image.
  c.train.dice_batch = True
  c.train.checkpoint_every = 1  # epochs between checkpoints of the latest and the best state

  c.eval.overlay_images = 8  # test images in overlays_test.png (0 = no figure)
  finetune_config.common_fields(c)
  c.data.vflip = False  # random vertical flip, p = 0.5 (on device, image and mask alike)
  c.data.rot90 = False  # RandomRotate90 with p = 0.5: k·90°, k ~ U{0..3} (on device, square images)

  if c.paper == "usfm":
    c.train.batch_size = 64
    c.train.epochs = 400
    c.train.warmup_epochs = 20
    c.train.lr = 3e-4 * 64 / 512
    c.train.min_lr = 0.0
    c.train.schedule = "timm_cosine"
    c.train.warmup_lr = 5e-5 * 64 / 512  # Seg.yaml warmup_lr, scaled by B/512
    # usdsgen/utils/optimizer.py builds layer groups only for model types swin / vit: the
    # EncoderDecoder runs `model.parameters()`, plain AdamW with weight decay 0.05 on every
    # parameter; Seg.yaml's layer_decay 0.65 is never read.
    c.train.weight_decay = 0.05
    c.train.layer_decay = 1.0
    c.train.no_decay = "none"
    c.train.grad_clip = 5.0
    c.eval.every_epochs = 5  # Seg.yaml val_freq; the kept epoch is the best validation Dice
    # usdsgen/data/datasets.py: A.Resize + RandomRotate90 + HorizontalFlip + VerticalFlip, p = 0.5 each
    c.data.crop_scale_min = 1.0
    c.data.hflip = True
    c.data.vflip = True
    c.data.rot90 = True
    c.model.drop_path = 0.1
    c.model.channels = 768
    c.model.blocks = "4,6,8,12"  # 1-based = USFM's 0-based out_indices [3, 5, 7, 11]
    c.model.aux_channels = 256
    c.train.aux_weight = 0.4
    c.train.dice_weight = 0.0  # USFM: cross-entropy only (CE + Dice stays an option)
    c.data.interpolation = "bilinear"  # usdsgen/data/datasets.py: albumentations A.Resize (linear)
  if args.smoke:
    smoke(c)
  if args.epochs:  # after smoke: `smoke,epochs=5` means 5 epochs of the smoke run
    c.train.epochs = args.epochs
  return c


def smoke(c) -> None:
  """About a minute on 2 CPU cores from a smoke pretraining workdir (32 px, micro ViT)."""
  config_base.downstream_smoke(c)
  if c.model.aux_channels:
    c.model.aux_channels = 16
    c.model.blocks = ""  # the 2-block smoke encoder
  # Stored at 128 px: resizing to the model's 32 px averages the speckle, so the ~20-pixel lesions
  # stay visible.
  c.data.native_size = 128
  c.model.channels = 32
  c.model.norm_groups = 8
  c.model.drop_path = 0.0
  c.model.dropout = 0.0
  c.train.batch_size = 16
  c.train.epochs = 40  # 640 steps: the head needs a few hundred before it outputs lesion pixels
  c.train.lr = 1e-2
  c.train.checkpoint_every = 10
  c.train.log_every = 80
  c.eval.overlay_images = 8
