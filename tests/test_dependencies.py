"""The runtime needs only requirements.txt: every mae_jax module imports, and the built-in dataset
builds, with the test-only references (torch, timm, transformers, OpenCV, scikit-learn, the
focal-frequency-loss package) made unimportable. (us_phantom once imported OpenCV, which only
requirements-test.txt installs.)"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_ONLY = ("torch", "torchvision", "timm", "transformers", "cv2", "sklearn", "focal_frequency_loss")

SCRIPT = f"""
import importlib, pkgutil, sys
BLOCKED = {TEST_ONLY!r}

class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"{{name}} is test-only (requirements-test.txt)")
    return None

sys.meta_path.insert(0, Block())
import mae_jax
names = [m.name for m in pkgutil.walk_packages(mae_jax.__path__, "mae_jax.")]
for name in names:
  importlib.import_module(name)
from mae_jax.data import us_phantom
us_phantom.build(sys.argv[1], num_train=3, num_validation=1, num_test=1, image_size=32, seed=0)
src = us_phantom.data_source(sys.argv[1], "train", num_train=3, num_validation=1, num_test=1,
                             image_size=32, seed=0)
assert len(src) == 3
print("imported", len(names), "modules")
"""


def test_runtime_imports_without_test_only_packages(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  last = out.stdout.strip().splitlines()[-1].split()
  assert last[0] == "imported" and int(last[1]) > 30, out.stdout[-2000:]
