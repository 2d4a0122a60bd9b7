"""The mesh and every sharding: the only module that names devices.

The batch is split over every device along ('data', 'fsdp'); parameters and optimizer state are
replicated, or split over 'fsdp' when `config.mesh.fsdp > 1` (for ViT-L/H), and the same step
function runs either way.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**14  # default `mesh.fsdp_min_size`: ViT-L/H biases and norms stay replicated


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({len(devices)})")
  # Auto axes: the step functions place data with `in_shardings`, not with explicit-axis types.
  return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH_AXES, (AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh, tree=None):
  """The sharding that keeps an array whole on every device; with `tree`, one per leaf."""
  s = NamedSharding(mesh, P())
  return s if tree is None else jax.tree.map(lambda _: s, tree)


def param_sharding(mesh: Mesh, x, min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
  """FSDP: split the largest axis divisible by the fsdp size; arrays with fewer than `min_size`
  elements (gathering them would cost more than the memory they save) or no divisible axis stay
  replicated."""
  n = mesh.shape["fsdp"]
  shape = getattr(x, "shape", ())
  if n == 1 or not shape or int(np.prod(shape)) < min_size:
    return replicated(mesh)
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(mesh: Mesh, tree, min_size: int = FSDP_MIN_SIZE):
  return jax.tree.map(lambda x: param_sharding(mesh, x, min_size), tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's slice (every process holds only its rows)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def host_gather(tree):
  """A (possibly multi-process) global pytree as host numpy arrays, whole on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
