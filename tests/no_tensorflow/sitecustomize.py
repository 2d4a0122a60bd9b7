"""Put this folder first on PYTHONPATH and TensorFlow is not there for the process: `import
tensorflow` raises ModuleNotFoundError and `importlib.util.find_spec("tensorflow")` is None, as on
a machine without it (tensorflow-datasets and etils ask find_spec before they use it). The runtime
must not need TensorFlow (issue 25); tests/test_dependencies.py and .ci/run use this."""

import importlib.machinery
import sys


class _WithoutTensorFlow(importlib.machinery.PathFinder):
  """The standard path finder, minus the `tensorflow` package."""

  @classmethod
  def find_spec(cls, fullname, path=None, target=None):
    if fullname == "tensorflow" or fullname.startswith("tensorflow."):
      return None
    return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_WithoutTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
