"""Shared test set-up: built datasets go to one cache (built once, under a lock) and configs load by path."""

import importlib.util
import os
import pathlib
import tempfile

import pytest

os.environ.setdefault("MAE_JAX_DATA", os.path.join(tempfile.gettempdir(), "mae_jax_test_data"))

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """`load_config('d2mae', 'smoke')` -> configs/d2mae.py:get_config('smoke')."""
  path = REPO / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def config_loader():
  return load_config
