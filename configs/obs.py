"""D²MAE optimal blurriness search on its own (docs/methods.md#d2mae): σ* per image of train / validation /
test as JSON, and a histogram figure per organ, in WORKDIR/obs/. Fine-tuning runs the same search
(and caches it in its own workdir), so this job is for inspecting σ* distributions (paper Fig. 3b).

ARGS: init_from=DIR (a D²MAE pretraining workdir), step=S (search step; default: the pretraining
config's `obs.step`, 2 in the paper), smoke.

  python -m mae_jax.main --config=configs/obs.py:init_from=PRE --workdir=OBS
  python -m mae_jax.main --config=configs/obs.py:smoke,init_from=PRE,step=1 --workdir=OBS
"""

import ml_collections
from ml_collections import config_dict

from mae_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, init_from="", step=0)
  c = ml_collections.ConfigDict()
  c.job = "obs"
  c.seed = 0
  c.init_from = args.init_from
  c.init_step = config_dict.placeholder(int)
  c.data = config_base.base(config_base.parse_arg("smoke" if args.smoke else "")).data
  c.obs = ml_collections.ConfigDict()
  c.obs.mode = "search"
  c.obs.step = config_dict.placeholder(int)
  c.obs.fixed_sigma = config_dict.placeholder(float)
  c.obs.batch_size = 64
  if args.step:
    c.obs.step = args.step
  return c
