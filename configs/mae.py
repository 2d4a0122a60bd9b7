"""MAE (He et al. 2022): the baseline. Published pretraining recipe (MAE Table A.1):
ViT-B/16, 224 px, mask ratio 0.75, normalised-pixel loss on masked patches, AdamW (0.9, 0.95),
wd 0.05, base lr 1.5e-4 × batch/256, batch 4096, 800 epochs with 40 warm-up, RRC(0.2–1) + flip.

  python -m mae_jax.main --config=configs/mae.py:b --workdir=DIR
  python -m mae_jax.main --config=configs/mae.py:smoke --workdir=DIR
"""

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg)
  return config_base.base(args)
