"""Every recipe's `smoke` config trains on the built-in dataset and its loss falls (issue 3)."""

import numpy as np
import pytest

from mae_jax.train import pretrain
from tests.conftest import load_config


@pytest.mark.parametrize("name", ["mae", "deblur_mae", "denoise_mae", "d2mae", "usfm"])
def test_smoke_config_trains_and_loss_falls(name, tmp_path):
  config = load_config(name, "smoke")
  config.train.total_steps = 40
  config.train.log_every = 2
  config.train.image_every = 40
  out = pretrain.train(config, str(tmp_path))
  losses = np.array([l for _, l in out["history"]])
  assert out["step"] == 40 and np.isfinite(losses).all()
  assert losses[-5:].mean() < losses[:5].mean(), losses
  assert (tmp_path / "checkpoints" / "40").is_dir()
