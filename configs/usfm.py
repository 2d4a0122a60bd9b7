"""USFM (Medical Image Analysis 2024) spatial-frequency dual masked image modelling.

Published setting (§3.2, §4.2): ViT-B/16 encoder, SimMIM-style linear decoder, 224 px; spatial mean
masking ratio 0.4 (masked units 32×32 px filled with the image mean); frequency band-stop masking as
the authors' `Frequency_MASK` (openmedlab/USFM usdsgen/data/transforms.py: a protected disk of radius
5, 7 rings, 2 dropped per image, abs of the inverse FFT; the five values are the project's reading,
docs/methods.md#usfm); loss L1 + λ·FFL with λ = 0.4 and α = 1;
organ-balanced sampling (Eq. 1: every image drawn with weight 1/√N_organ, so an organ's share is
∝ √N_organ; docs/methods.md#organ-balanced-sampling). The pretraining optimizer is not published: we
keep MAE's.

Augmentation (§3.1: rotation, scaling, cropping, brightness and contrast, Gaussian blur) runs on
device before the masking, with the ranges of `config.augment` (the paper publishes none; see
mae_jax/corrupt/augment.py); `noaug` turns it off.

Ablations: nofreq (USFM-woF, no frequency mask), nobalance (USFM-woS, uniform sampling), simmim
(SimMIM-US, USFM's ablation row: SimMIM's masking on ultrasound — random 32×32 units with ratio 0.6,
no frequency mask, uniform sampling, L1 loss only; SimMIM fills masked units with a learned token
and scores only them, this path fills them with the image mean and scores the whole image;
no USFM augmentation, SimMIM's pipeline is crop + flip).

  python -m mae_jax.main --config=configs/usfm.py:b --workdir=DIR
  python -m mae_jax.main --config=configs/usfm.py:smoke,nofreq --workdir=DIR
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, nofreq=False, nobalance=False, noaug=False, simmim=False)
  c = config_base.base(args)
  c.recipe = "usfm"
  c.model.path = "simmim"
  # USFM's released backbone (openmedlab/USFM configs/model/Cls/vit.yaml); model.backbone=vit for MAE's ViT.
  c.model.backbone = "beit"
  c.model.mask_ratio = 0.0  # no token dropping on the SimMIM path; masking is in pixel space
  c.model.norm_pix_loss = False  # L1 + FFL on the (dataset-normalised) image, no per-patch norm (§3.2)
  c.corrupt.spatial_ratio = 0.4
  c.corrupt.frequency = not args.nofreq
  c.data.sampler = "shuffle" if args.nobalance else "balanced"
  c.augment.enabled = not (args.noaug or args.simmim)
  if args.smoke:
    # The radii are in bins (as USFM's Frequency_MASK): at 32 px the 224-px values leave 2 rings and
    # drop none. These give 7 rings, radii 1 | 2 | 3 | 4 | 6 | 9 | 12 | 15, and drop 2, as at 224.
    c.corrupt.freq_center_protect, c.corrupt.freq_base_bw = 1, 2
    c.corrupt.freq_increase_factor, c.corrupt.freq_max_increase = 0.5, 3
  if args.simmim:
    c.corrupt.spatial_ratio = 0.6  # SimMIM's mask ratio, 32-px mask units (spatial_unit)
    c.corrupt.frequency = False
    c.data.sampler = "shuffle"
    c.model.ffl_weight = 0.0  # SimMIM: L1 only
  return c
