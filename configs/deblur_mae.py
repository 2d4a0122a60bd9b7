"""Deblurring MAE (Kang et al., MICCAI 2023): blur the image, mask it, reconstruct the *original*.

Published setting: ViT-B/16, 224 px, mask ratio 0.75, Gaussian blur σ = 1.1 (SRAD N = 40, Δt = 0.1
as the second variant), batch 256, 12,000 epochs; loss against the unblurred image on all patches
(SPEC §2). Ablations (paper Table 2): blur=gaussian|srad|mean|median|motion|defocus (kernel 5,
defocus radius 5) and sigma=0.3..1.9.

  python -m mae_jax.main --config=configs/deblur_mae.py:b,blur=srad --workdir=DIR
  python -m mae_jax.main --config=configs/deblur_mae.py:smoke,sigma=1.5 --workdir=DIR

Deliberate difference from openmedlab/DeblurringMIM: we blur on device, after crop and resize, at
model resolution; the reference blurs offline at native resolution before cropping.
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, blur="gaussian", sigma=1.1)
  c = config_base.base(args)
  c.recipe = "deblur"
  c.corrupt.blur = args.blur
  c.corrupt.sigma = args.sigma
  c.model.loss_on = "all"
  c.train.batch_size = 256 if not args.smoke else c.train.batch_size
  c.train.epochs = 12000
  return c
