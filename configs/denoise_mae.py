"""Denoising MAE: the baseline of Deblurring MAE Table 1 — add Gaussian noise instead of blurring,
reconstruct the clean image on all patches, with the same pixel-wise MSE (`norm_pix_loss=False`)
as Deblurring MAE (docs/methods.md#denoising-mae).

  python -m mae_jax.main --config=configs/denoise_mae.py:b,std=0.1 --workdir=DIR
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, std=0.1)
  c = config_base.base(args)
  c.recipe = "denoise"
  c.corrupt.noise_std = args.std
  c.model.norm_pix_loss = False  # as Deblurring MAE, which it is the baseline of
  c.model.loss_on = "all"
  c.train.batch_size = 256 if not args.smoke else c.train.batch_size
  c.train.epochs = 12000
  return c
