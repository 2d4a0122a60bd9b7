"""D²MAE (MICCAI 2025): diffusional deblurring MAE.

Published setting (§3 Implementation Details, Table 3): ViT-B/16, 224 px, mask ratio 0.75,
blur levels σ_t = 0.1·t for t = 1..11 (0.1→1.1), t ~ U{1..T} per image, blurriness token
BLU(t) = DDPM sinusoid + a learnable vector inserted after CLS, MSE against the original on all
patches in pixel space (Eq. 3; `norm_pix_loss=False`, as the same authors' Deblurring MAE code
trains), so the optimal blurriness search scores in pixel space too; batch 1024, 8,000 epochs
(thyroid). Fine-tuning runs the optimal blurriness search first with step s = 2. Details and
sources: docs/methods.md#d2mae.

Ablations (Table 3), as config arguments:
  range=0.1:0.6:0.1 | 0.1:1.1:0.1 | 0.1:1.6:0.1    embed=none | add | token
  obs=none | fixed | search (fixed σ = 0.5)         step=1 | 2 | 3

  python -m mae_jax.main --config=configs/d2mae.py --workdir=DIR
  python -m mae_jax.main --config=configs/d2mae.py:smoke,embed=add --workdir=DIR
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, range="0.1:1.1:0.1", embed="token", obs="search", step=2,
                               fixed_sigma=0.5)
  c = config_base.base(args)
  c.recipe = "d2mae"
  # The blur is a Gaussian of σ_t from sigma_levels (corrupt.sigma, Deblurring MAE's fixed σ, is unused):
  # config.json says so instead of the base config's blur='none'.
  c.corrupt.blur = "gaussian"
  c.corrupt.sigma_levels = args.range
  c.model.blur_embed = args.embed
  c.model.norm_pix_loss = False  # Eq. 3: MSE between x̂ and x
  c.model.loss_on = "all"
  c.train.batch_size = 1024 if not args.smoke else c.train.batch_size
  c.train.epochs = 8000
  # Read by the downstream jobs from the saved config (the workdir is the whole truth of a run).
  c.obs = dict(mode=args.obs, step=args.step, fixed_sigma=args.fixed_sigma)
  return c
