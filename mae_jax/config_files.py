"""The files under configs/: found by name, loaded as `--config=configs/NAME.py:ARG` loads them,
with dotted-key overrides (`{'train.epochs': 5}`) checked against the fields that exist.

configs/ sits next to the package in the source tree, so this needs a clone (or an editable
install of one); the error says so.
"""

from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")


def config_path(name: str) -> str:
  """configs/NAME.py, or NAME itself when it is a path to a .py file."""
  path = name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  path = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.exists(path):
    raise ValueError(f"no config file {path!r}: configs/ is read from the source tree next to the "
                     "package (a clone, installed with pip install -e .)")
  return path


def load_module(path: str):
  """A Python file as a module object (config and experiment files are not a package)."""
  stem = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"mae_jax_configs_{stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(config, overrides: dict | None, where: str = "the config"):
  """Sets dotted keys in place; a key that names no existing field is an error, not a new field."""
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise ValueError(f"override {key!r}: {where} has no such field")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"override {key!r}: {where} has no such field")
    node[leaf] = value
  return config


def load(name: str, arg: str | None = None, overrides: dict | None = None):
  """`load('d2mae', 'smoke')` = configs/d2mae.py:get_config('smoke'), then `overrides`."""
  path = config_path(name)
  config = load_module(path).get_config(arg or None)
  return apply_overrides(config, overrides, f"configs/{os.path.basename(path)}")
