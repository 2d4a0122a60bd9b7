"""Linear probing (MAE main_linprobe.py; docs/methods.md#downstream): frozen encoder, the CLS token after the final
norm (`pool=avg`: the mean patch token through a frozen fc_norm, main_linprobe.py --global_pool),
BatchNorm without affine (eps 1e-6) + Linear, LARS (trust 0.001, momentum 0.9), base lr 0.1 ×
batch/256, no weight decay, 90 epochs with 10 warm-up. The same arguments as configs/finetune.py.

  python -m mae_jax.main --config=configs/linear_probe.py:init_from=PRE --workdir=LP
  python -m mae_jax.main --config=configs/linear_probe.py:smoke,init_from=PRE --workdir=LP
"""

import os

from mae_jax import config_base, config_files


def get_config(arg=None):
  args = config_base.parse_arg(arg, **config_base.DOWNSTREAM_ARGS, probe=True, mixup=False, pool="")
  args.probe = True
  finetune = config_files.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py"))
  return finetune.downstream(args)
