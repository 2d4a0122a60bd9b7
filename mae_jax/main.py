"""Command line: `python -m mae_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR`.

`--config.a.b=value` overrides any field; an unknown field or a wrong type is an error before
anything runs. The job (pretrain, finetune, linear_probe, segment, obs, enhance) comes from `config.job`.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, with :ARGS.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, figures and results go.")
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("mae_jax")


class _QuietLibraries(logging.Filter):
  """Our progress lines and every library's warnings, minus the routine chatter of the TFDS builder
  behind the built-in dataset (it logs each config at WARNING level)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


def _setup_logging():
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stdout, force=True)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  # orbax, grain and TFDS log through absl at INFO on every save and read.
  for noisy in ("absl", "orbax", "jax._src", "grain", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:  # progress bars of the one-time build of the built-in dataset
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  except ImportError:
    pass


def run(config, workdir: str):
  from mae_jax import distributed
  distributed.maybe_initialize()
  job = config.get("job", "pretrain")
  if job == "pretrain":
    from mae_jax.train import pretrain
    return pretrain.train(config, workdir)
  if job in ("finetune", "linear_probe"):
    from mae_jax.train import finetune
    return finetune.run(config, workdir)
  if job == "segment":
    from mae_jax.train import segment
    return segment.run(config, workdir)
  if job == "obs":
    from mae_jax.train import obs
    return obs.run(config, workdir)
  if job == "enhance":
    from mae_jax.train import enhance
    return enhance.run(config, workdir)
  raise ValueError(f"config.job={job!r}: expected pretrain, finetune, linear_probe, segment, obs or enhance")


def main(argv):
  del argv
  _setup_logging()
  from mae_jax.train import workdir_lock
  try:
    run(_CONFIG.value, os.path.expanduser(_WORKDIR.value))
  except workdir_lock.RunStopped as e:  # a busy workdir, no readable checkpoint, a failed save
    print(f"mae_jax: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  app.run(main)
