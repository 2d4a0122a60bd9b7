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


NO_JAX_SCRIPT = r"""
import glob, io, os, runpy, sys, contextlib
from mae_jax import config_files
loaded = 0
for path in sorted(glob.glob(os.path.join(config_files.CONFIG_DIR, "*.py"))):
  for arg in (None, "smoke"):
    try:
      config_files.load_module(path).get_config(arg)
      loaded += 1
    except ValueError:  # a config without a smoke variant
      pass
for path in sorted(glob.glob(os.path.join(config_files.CONFIG_DIR, "experiments", "*.py"))):
  config_files.load_module(path).get_experiment()
  loaded += 1
sys.argv = ["mae_jax.main", "--config=configs/mae.py:smoke", "--config.train.bsize=3", "--workdir=" + sys.argv[1]]
err = io.StringIO()
try:
  with contextlib.redirect_stderr(err):
    runpy.run_module("mae_jax.main", run_name="__main__")
except SystemExit as e:
  code = e.code
print(loaded, code, repr(err.getvalue().splitlines()[0]))
print(sorted(m for m in ("jax", "jaxlib", "flax", "optax", "orbax", "tensorflow") if m in sys.modules))
"""


def test_configs_load_and_a_typo_is_rejected_without_jax(tmp_path):
  """Loading every config (and rejecting a misspelt field) reads no jax or flax: a typo costs a
  fraction of a second, not the seconds of jax's import."""
  import os
  import subprocess
  import sys

  from tests.conftest import REPO
  out = subprocess.run([sys.executable, "-c", NO_JAX_SCRIPT, str(tmp_path / "w")], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.returncode == 0, out.stderr[-3000:]
  first, modules = out.stdout.strip().splitlines()[-2:]
  n, code, message = first.split(" ", 2)
  assert int(n) >= 15 and code == "2", first
  assert "no field 'train.bsize'" in message, message
  assert modules == "[]", modules
  assert not (tmp_path / "w").exists()
