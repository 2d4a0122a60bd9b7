"""Deblurring MAE (Kang et al., MICCAI 2023): blur the image, mask it, reconstruct the *original*.

Published setting (§2.2, §3.1): ViT-B/16, 224 px, mask ratio 0.75, Gaussian blur σ = 1.1 (SRAD
N = 40, Δt = 0.1 as the second variant), batch 256, 12,000 epochs; pixel-wise MSE against the
unblurred image on all patches (§2.2), in pixel space: `norm_pix_loss=False`, as
openmedlab/DeblurringMIM `main_pretrain.py` trains it by default and `scripts/pretrain/de_mae.sh`
never overrides. Ablations (paper Table 2): blur=gaussian|srad|mean|median|motion|defocus (kernel 5,
defocus radius 5) and Gaussian sigma=0.8|1.1|1.4|1.7|2.0|2.3. Details and sources:
docs/methods.md#deblurring-mae.

  python -m mae_jax.main --config=configs/deblur_mae.py:b,blur=srad --workdir=DIR
  python -m mae_jax.main --config=configs/deblur_mae.py:smoke,sigma=1.4 --workdir=DIR
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, blur="gaussian", sigma=1.1)
  c = config_base.base(args)
  c.recipe = "deblur"
  c.corrupt.blur = args.blur
  c.corrupt.sigma = args.sigma
  c.model.norm_pix_loss = False  # pixel-wise MSE (§2.2; DeblurringMIM main_pretrain.py default)
  c.model.loss_on = "all"
  c.train.batch_size = 256 if not args.smoke else c.train.batch_size
  c.train.epochs = 12000
  return c
