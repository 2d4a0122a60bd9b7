"""MAE (He et al. 2022): the baseline. Published pretraining recipe (MAE Table A.1):
ViT-B/16, 224 px, mask ratio 0.75, normalised-pixel loss on masked patches, AdamW (0.9, 0.95),
wd 0.05, base lr 1.5e-4 × batch/256, batch 4096, 800 epochs with 40 warm-up, RRC(0.2–1) + flip.

`norm_pix=false` trains the ultrasound MAE baseline of Deblurring MAE Tables 1–2 and D²MAE Table 2
("MAE (US)") as openmedlab/DeblurringMIM does: pixel MSE, its `main_pretrain.py` default, which its
`scripts/pretrain/mae.sh` never overrides (docs/methods.md#mae-us).

  python -m mae_jax.main --config=configs/mae.py:b --workdir=DIR
  python -m mae_jax.main --config=configs/mae.py:smoke --workdir=DIR
  python -m mae_jax.main --config=configs/mae.py:b,norm_pix=false --workdir=DIR
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, norm_pix=True)
  c = config_base.base(args)
  c.model.norm_pix_loss = args.norm_pix  # He et al. §3: per-patch "normalized pixels" as the target
  return c
