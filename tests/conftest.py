"""Shared test set-up: built datasets go to one cache (built once, under a lock) and configs load by path."""

import os
import pathlib
import runpy
import tempfile

import pytest

os.environ.setdefault("MAE_JAX_DATA", os.path.join(tempfile.gettempdir(), "mae_jax_test_data"))
# One XLA compilation cache (JAX's persistent cache) for the test processes and every command they
# start: the suite compiles the same tiny models and steps in hundreds of fresh processes, each
# compile taking most of such a run on CPU. Set before jax is imported; a cached executable is the
# one the compiler gave, so bit-exactness tests compare what they compared before.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mae_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny and compiled far more often than they run: LLVM's cheapest
# optimisation level compiles them faster (a test's two sides always compile alike, and a test that
# starts commands with other XLA_FLAGS compares those commands with each other). Users' runs compile
# with XLA's defaults.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                   "--xla_backend_optimization_level=0"]))

REPO = pathlib.Path(__file__).resolve().parents[1]

# Nothing at run time needs TensorFlow, and CI installs none: where a venv still has it, the tests
# (and the commands they start) run without it too (tests/no_tensorflow/sitecustomize.py).
_NO_TF = str(REPO / "tests" / "no_tensorflow")
runpy.run_path(os.path.join(_NO_TF, "sitecustomize.py"))
if _NO_TF not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
  os.environ["PYTHONPATH"] = os.pathsep.join([_NO_TF, *filter(None, [os.environ.get("PYTHONPATH")])])


def load_config(name: str, arg: str | None = None):
  """`load_config('d2mae', 'smoke')` -> configs/d2mae.py:get_config('smoke')."""
  from mae_jax import config_files
  return config_files.load(name, arg)


@pytest.fixture
def config_loader():
  return load_config


# Tests that each take minutes start first: under `-n 2`, one collected late would run alone at the
# end while the other worker idles.
_LONG_FIRST = ("test_notebook.py::test_notebook_trains_the_d2mae_demo_and_it_learns",
               "test_distributed.py::test_two_processes_train_like_one_and_checkpoints_cross")


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: not any(item.nodeid.endswith(name) for name in _LONG_FIRST))  # stable
