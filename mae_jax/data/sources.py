"""One entry point from `config.data` to a random-access source of records.

`us_phantom` (the built-in simulated dataset, built on first use) or `folder` (a directory of real
images, converted once into the same record format next to the other built datasets).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os


@contextlib.contextmanager
def _build_lock(root: str, name: str):
  """Two processes (test workers, the hosts of a pod sharing a disk) must not build one dataset at once."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def data_root(dcfg) -> str:
  root = dcfg.data_dir or os.environ.get("MAE_JAX_DATA") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")
  return os.path.abspath(os.path.expanduser(root))


def open_source(dcfg, split: str, *, task: str = "pretrain"):
  """The `split` ('train' | 'validation' | 'test') of the dataset named by `dcfg.name`."""
  if dcfg.name == "us_phantom":
    from mae_jax.data import us_phantom
    kwargs = dict(num_train=dcfg.num_train, num_validation=dcfg.num_validation,
                  num_test=dcfg.num_test, image_size=dcfg.native_size, seed=dcfg.seed)
    name = "us_phantom-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    with _build_lock(data_root(dcfg), name):  # per size: other sizes build in parallel
      us_phantom.build(data_root(dcfg), **kwargs)
    return us_phantom.data_source(data_root(dcfg), split, **kwargs)
  if dcfg.name == "folder":
    from mae_jax.data import folder
    if not dcfg.folder:
      raise ValueError("data.folder is empty: with data.name='folder' it must name a directory of images")
    src = os.path.abspath(os.path.expanduser(dcfg.folder))
    tag = hashlib.sha1(f"{src}|{task}|{dcfg.seed}".encode()).hexdigest()[:10]
    out = os.path.join(data_root(dcfg), "folders", f"{os.path.basename(src.rstrip('/'))}-{task}-{tag}")
    with _build_lock(data_root(dcfg), os.path.basename(out)):
      if not os.path.exists(os.path.join(out, "metadata.json")):
        folder.build_folder_dataset(src, out, task=task, split_seed=dcfg.seed)
    return folder.folder_source(out, split)
  raise ValueError(f"data.name={dcfg.name!r}: expected 'us_phantom' or 'folder'")
