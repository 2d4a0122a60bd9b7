"""`config_files.load` (sweeps, figures, benchmarks, tests) gives the config the CLI's
`--config=configs/NAME.py:ARG` gives (ml_collections' own config-file flag, as in mae_jax.main), and
overrides only set fields that exist."""

import pytest
from absl import flags
from ml_collections import config_flags

from mae_jax import config_files


@pytest.mark.parametrize("name,arg", [("d2mae", "smoke"), ("usfm", "b,nofreq"), ("linear_probe", "pool=avg")])
def test_load_equals_the_cli_config_flag(name, arg):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False)
  fv(["prog", f"--config={config_files.config_path(name)}:{arg}"])
  assert config_files.load(name, arg).to_dict() == fv.config.to_dict()


def test_overrides_set_existing_fields_only():
  c = config_files.load("mae", "smoke", {"train.batch_size": 7, "model.mask_ratio": 0.5})
  assert c.train.batch_size == 7 and c.model.mask_ratio == 0.5
  with pytest.raises(ValueError, match=r"'train\.nope'.*configs/mae\.py has no such field"):
    config_files.load("mae", "smoke", {"train.nope": 1})
  with pytest.raises(ValueError, match=r"'nosection\.x'.*no such field"):
    config_files.load("mae", "smoke", {"nosection.x": 1})
  with pytest.raises(ValueError, match="no config file"):
    config_files.load("no_such_config")
