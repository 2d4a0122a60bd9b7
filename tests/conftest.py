"""Shared test set-up: built datasets go to one cache (built once, under a lock) and configs load by path."""

import os
import pathlib
import tempfile

import pytest

os.environ.setdefault("MAE_JAX_DATA", os.path.join(tempfile.gettempdir(), "mae_jax_test_data"))

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """`load_config('d2mae', 'smoke')` -> configs/d2mae.py:get_config('smoke')."""
  from mae_jax import config_files
  return config_files.load(name, arg)


@pytest.fixture
def config_loader():
  return load_config
