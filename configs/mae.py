"""MAE (He et al. 2022): the baseline. Published pretraining recipe (MAE Table A.1):
ViT-B/16, 224 px, mask ratio 0.75, normalised-pixel loss on masked patches, AdamW (0.9, 0.95),
wd 0.05, base lr 1.5e-4 × batch/256, batch 4096, 800 epochs with 40 warm-up, RRC(0.2–1) + flip.

`us` trains the ultrasound MAE baseline of Deblurring MAE Tables 1–2 and D²MAE Table 2 ("MAE (US)")
as openmedlab/DeblurringMIM `scripts/pretrain/mae.sh` does: the same `main_pretrain.py` as its
deblurring runs (`scripts/pretrain/de_mae.sh`), so pixel MSE (`norm_pix_loss` defaults to False
there), batch 128 per GPU × 2 GPUs = 256 and its default 12,000 epochs — the deblurring rows' batch
and epochs (configs/deblur_mae.py), not He et al.'s 4096 / 800 (docs/methods.md#mae-us).
`norm_pix=false` alone changes only the loss space.

  python -m mae_jax.main --config=configs/mae.py:b --workdir=DIR
  python -m mae_jax.main --config=configs/mae.py:smoke --workdir=DIR
  python -m mae_jax.main --config=configs/mae.py:b,us --workdir=DIR
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, norm_pix=True, us=False)
  c = config_base.base(args)
  c.model.norm_pix_loss = args.norm_pix  # He et al. §3: per-patch "normalized pixels" as the target
  if args.us:  # DeblurringMIM main_pretrain.py defaults, as scripts/pretrain/mae.sh runs them
    c.model.norm_pix_loss = False
    c.train.batch_size = 256 if not args.smoke else c.train.batch_size
    c.train.epochs = 12000
  return c
