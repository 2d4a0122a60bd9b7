"""The runtime needs only requirements.txt, and no TensorFlow: every mae_jax module imports, and the
built-in dataset builds and reads, with the test-only references (torch, timm, transformers, OpenCV,
scikit-learn, the focal-frequency-loss package) made unimportable and TensorFlow hidden
(tests/no_tensorflow/sitecustomize.py). (us_phantom once imported OpenCV, which only
requirements-test.txt installs, and was once a tensorflow-datasets builder; TensorBoard events
were once written by TensorFlow.)"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_TF = ROOT / "tests" / "no_tensorflow"
TEST_ONLY = ("torch", "torchvision", "timm", "transformers", "cv2", "sklearn", "focal_frequency_loss")
# Installed here (by other tools) but no dependency any more: the runtime must not reach for them.
NOT_DEPENDENCIES = ("tensorflow_datasets", "tensorflow_metadata", "pyarrow")

SCRIPT = f"""
import importlib, importlib.util, pkgutil, sys
BLOCKED = {TEST_ONLY!r}
GONE = {NOT_DEPENDENCIES!r}

class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"{{name}} is test-only (requirements-test.txt)")
    if name.split(".")[0] in GONE:
      raise ModuleNotFoundError(f"{{name}} is not in requirements.txt")
    return None

sys.meta_path.insert(0, Block())
assert importlib.util.find_spec("tensorflow") is None, "the TensorFlow blocker is not active"
import mae_jax
names = [m.name for m in pkgutil.walk_packages(mae_jax.__path__, "mae_jax.")]
for name in names:
  importlib.import_module(name)
from mae_jax.data import us_phantom
us_phantom.build(sys.argv[1], num_train=3, num_validation=1, num_test=1, image_size=32, seed=0)
src = us_phantom.data_source(sys.argv[1], "train", num_train=3, num_validation=1, num_test=1,
                             image_size=32, seed=0)
assert len(src) == 3 and src[0]["image"].shape == (32, 32, 1)
assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules
print("imported", len(names), "modules")
"""


def no_tensorflow_env(env: dict | None = None) -> dict:
  """`env` (default: this process's) with TensorFlow hidden from a subprocess."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join([str(NO_TF), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
  return env


def test_runtime_imports_without_test_only_packages_or_tensorflow(tmp_path):
  env = no_tensorflow_env({**os.environ, "JAX_PLATFORMS": "cpu"})
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  last = out.stdout.strip().splitlines()[-1].split()
  assert last[0] == "imported" and int(last[1]) > 30, out.stdout[-2000:]


def test_the_blocker_hides_tensorflow():
  # The guard the other no-TensorFlow tests rely on: it must actually fail an import.
  code = ("import importlib.util\nassert importlib.util.find_spec('tensorflow') is None\n"
          "try:\n  import tensorflow\nexcept ModuleNotFoundError:\n  print('blocked')\n")
  out = subprocess.run([sys.executable, "-c", code], env=no_tensorflow_env(), capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0 and out.stdout.strip() == "blocked", out.stderr[-2000:]


def _requirement_names(path: pathlib.Path) -> list[str]:
  names = []
  for line in path.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line and not line.startswith("-"):
      names.append(re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0].lower().replace("_", "-"))
  return names


def _pyproject_names() -> list[str]:
  import tomllib
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = list(project.get("dependencies", []))
  for extra in project.get("optional-dependencies", {}).values():
    reqs += extra
  return [re.split(r"[\s<>=!~;\[@]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs]


# TensorFlow under any of its distribution names and its satellites (tensorflow-datasets,
# tensorflow-metadata: the built-in dataset writes its own record files), and MKL (a 0.9 GB BLAS
# no code uses).
FORBIDDEN = re.compile(r"^(tensorflow.*|tf-nightly.*|tfds-nightly|intel-tensorflow|mkl.*)$")


def test_requirements_name_no_tensorflow_package_and_no_mkl():
  names = {p.name: _requirement_names(p) for p in (ROOT / "requirements.txt", ROOT / "requirements-test.txt")}
  names["pyproject.toml"] = _pyproject_names()
  assert "jax" in names["requirements.txt"] and "jax" in names["pyproject.toml"]
  bad = {k: [n for n in v if FORBIDDEN.match(n)] for k, v in names.items()}
  assert not any(bad.values()), bad


def test_pinned_set_within_pyproject_ranges():
  """requirements.txt (what the README installs, exact pins) satisfies pyproject.toml's ranges."""
  import tomllib

  from packaging.requirements import Requirement
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      r = Requirement(line)
      pins[r.name.lower().replace("_", "-")] = next(iter(r.specifier)).version
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  for spec in project["dependencies"]:
    r = Requirement(spec)
    name = r.name.lower().replace("_", "-")
    assert name in pins, f"{name} is in pyproject.toml but not pinned in requirements.txt"
    assert r.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {r.specifier}"
  assert set(pins) == {Requirement(s).name.lower().replace("_", "-") for s in project["dependencies"]}
