"""Data-parallel and FSDP meshes on 8 host devices train like 1 device, and FSDP really shards.

The device count of a JAX process is fixed when jax is first imported, and other tests in the same
pytest process import it first; so each mesh layout runs in a fresh interpreter: this file, run as
a script (`python tests/test_sharding.py --devices=8 --fsdp=1,2 --out=F.json --workroot=DIR`), which sets
XLA_FLAGS before importing jax, trains the smoke model through `pretrain.train` on a tiny
deterministic in-memory source, and writes the per-step losses and the shardings of the live
train state. The reference is the same script with 1 device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

STEPS = 5
GLOBAL_BATCH = 16
IMAGE = 32
FSDP_MIN_SIZE = 1024  # the smoke model's kernels are 1024-4096 elements; its biases stay replicated


class FakeSource:
  """Deterministic records with some structure (a bright disc on speckle) so the loss moves."""

  def __init__(self, n: int, size: int = IMAGE, offset: int = 0):
    self.n, self.size, self.offset = n, size, offset

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    i = int(i) + self.offset
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[: self.size, : self.size]
    cy, cx, r = rng.uniform(8, self.size - 8, 2).tolist() + [rng.uniform(4, 10)]
    img = 60 + 40 * rng.random((self.size, self.size)) + 120 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    return {"image": np.clip(img, 0, 255).astype(np.uint8)[..., None], "organ": i % 3,
            "label": i % 2, "index": i}


def smoke_config(fsdp: int):
  from mae_jax import config_base
  c = config_base.base(config_base.parse_arg("smoke"))
  c.model.image_size = IMAGE
  c.data.mean, c.data.std = 0.4, 0.2  # fixed: no pass over the data for statistics
  c.train.batch_size = GLOBAL_BATCH
  c.train.total_steps = STEPS
  c.train.log_every = 1
  c.train.image_every = 0
  c.train.checkpoint_every = 1000
  c.mesh.fsdp = fsdp
  c.mesh.fsdp_min_size = FSDP_MIN_SIZE
  return c


def _worker(devices: int, fsdps: list[int], out: str, workroot: str) -> None:
  # Before jax is imported anywhere in this interpreter.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  from mae_jax.data import sources
  from mae_jax.train import checkpoint, pretrain, sharding

  assert jax.device_count() == devices, jax.devices()
  sources.open_source = lambda dcfg, split, **kw: FakeSource(64 if split == "train" else 8)

  seen = {}
  save = checkpoint.save_checkpoint

  def spy(mngr, step, state, data_state, **kw):
    # The live state of the loop, with the shardings the jitted step really produced.
    seen["state"] = [
        {"path": jax.tree_util.keystr(p), "shape": list(x.shape),
         "spec": [a if a is None or isinstance(a, str) else list(a) for a in x.sharding.spec],
         "shard": list(x.addressable_shards[0].data.shape)}
        for p, x in jax.tree_util.tree_leaves_with_path(state)]
    return save(mngr, step, state, data_state, **kw)

  checkpoint.save_checkpoint = spy
  results = {}
  for fsdp in fsdps:
    r = pretrain.train(smoke_config(fsdp), os.path.join(workroot, f"fsdp{fsdp}"))
    results[str(fsdp)] = {"losses": [loss for _, loss in r["history"]],
                          "state": seen["state"]}
  with open(out, "w") as f:
    json.dump(results, f)


# ----------------------------------------------------------------------------------------- tests


def test_fsdp_rule_on_vit_l_shapes():
  """The production rule (default mesh.fsdp_min_size) on ViT-L/16 shapes, fsdp=8."""
  import jax
  from jax.sharding import AbstractMesh

  from mae_jax.train import checkpoint, sharding
  mesh = AbstractMesh((2, 8), ("data", "fsdp"))

  def spec(shape, **kw):
    return tuple(sharding.param_sharding(mesh, jax.ShapeDtypeStruct(shape, np.float32), **kw).spec)

  assert spec((1024, 4096)) == (None, "fsdp")  # MLP kernels: the larger axis
  assert spec((4096, 1024)) == ("fsdp", None)
  assert spec((16 * 16, 1024)) == (None, "fsdp")  # patch embedding
  assert spec((1024,)) == spec((4096,)) == spec((1, 1, 1024)) == ()  # biases, norms, tokens
  assert spec((1001, 1003)) == ()  # no axis divisible by 8: replicated, not an error
  assert spec((1024,), min_size=0) == ("fsdp",)


def _launch(tmp_path, devices, fsdps):
  tag = f"d{devices}_f{'_'.join(map(str, fsdps))}"
  out = tmp_path / f"{tag}.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, __file__, f"--devices={devices}", f"--fsdp={','.join(map(str, fsdps))}",
         f"--out={out}", f"--workroot={tmp_path / tag}"]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return proc, out, devices


def test_dp_and_fsdp_meshes_match_one_device(tmp_path):
  # Three interpreters, so that both cores stay busy: the 1-device reference and the 8-device
  # meshes split in two.
  runs = [_launch(tmp_path, 1, [1]), _launch(tmp_path, 8, [1, 2]), _launch(tmp_path, 8, [4, 8])]
  results = {}
  try:
    for proc, out, devices in runs:
      log, _ = proc.communicate(timeout=600)
      assert proc.returncode == 0, log[-4000:]
      with open(out) as f:
        results.update({(f"d{devices}", k): v for k, v in json.load(f).items()})
  finally:
    for proc, _, _ in runs:  # none left running on a shared machine when one fails
      if proc.poll() is None:
        proc.kill()
        proc.communicate()

  ref = np.asarray(results[("d1", "1")]["losses"])
  assert ref.shape == (STEPS,) and np.all(np.isfinite(ref)) and np.ptp(ref) > 0
  for fsdp in (1, 2, 4, 8):
    got = np.asarray(results[("d8", str(fsdp))]["losses"])
    # Same global batch, masks and init: only the summation order of reductions differs.
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=0, err_msg=f"8 devices, fsdp={fsdp}")

  # Data-parallel: every array of the train state is replicated.
  for leaf in results[("d8", "1")]["state"]:
    assert all(a is None for a in leaf["spec"]), leaf
    assert leaf["shard"] == leaf["shape"], leaf

  for fsdp in (2, 4, 8):
    leaves = results[("d8", str(fsdp))]["state"]
    for leaf in leaves:
      if int(np.prod(leaf["shape"])) >= FSDP_MIN_SIZE:
        assert "fsdp" in leaf["spec"], leaf  # every smoke-model kernel has an axis divisible by 8
        expect = list(leaf["shape"])
        expect[leaf["spec"].index("fsdp")] //= fsdp
        assert leaf["shard"] == expect, leaf  # each device holds 1/fsdp of it
      else:
        assert "fsdp" not in leaf["spec"] and leaf["shard"] == leaf["shape"], leaf
    # The parameter and both Adam moments of a kernel are sharded, not just one of them.
    qkv = [leaf["path"] for leaf in leaves
           if leaf["path"].endswith("['encoder']['blocks'][0]['attn']['qkv']['kernel']")]
    assert len(qkv) == 3 and sum(p.startswith(".params") for p in qkv) == 1, qkv
    assert sum(".mu" in p for p in qkv) == 1 and sum(".nu" in p for p in qkv) == 1, qkv

if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, required=True)
  ap.add_argument("--fsdp", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--workroot", required=True)
  a = ap.parse_args()
  _worker(a.devices, [int(x) for x in a.fsdp.split(",")], a.out, a.workroot)
