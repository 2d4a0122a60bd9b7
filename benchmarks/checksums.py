"""Cost of checkpoint checksums for a MAE ViT-B/16 train state (params + AdamW moments).

`python -m benchmarks.checksums [--variant b] [--repeats 3] [--dir /tmp/ckpt_bench]` prints: the
state's size, the time to hash it (mae_jax/train/checksums.py), and the time of an orbax save
(until the call returns, as the train loop waits for it, and until the write is complete) and of a
restore, each with and without checksums. docs/reliability.md quotes the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
import zlib

import jax
import numpy as np
import optax

from mae_jax import config_files, models
from mae_jax.train import checkpoint, checksums, core


def _median(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="b")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dir", default="/tmp/ckpt_bench")
  args = ap.parse_args()
  config = config_files.load("mae", args.variant)
  model = models.build_pretrain_model(config.model, seed=0)
  _, params, _ = core.split_model(model)
  state = core.init_state(params, optax.adamw(1e-4), 0)
  state = jax.block_until_ready(jax.device_put(state))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"state: {n_params / 1e6:.1f} M parameters, {nbytes / 2**30:.2f} GiB with the AdamW moments; "
        f"{os.cpu_count()} CPUs, hashing threads {checksums._THREADS}, backend {jax.default_backend()}")
  t_hash = _median(lambda: checksums.record({"state": state}, {"next_batch": 0}), args.repeats)
  print(f"checksums (device_get + {checksums.ALGORITHM} of every array): {t_hash:.2f} s = "
        f"{nbytes / 2**30 / t_hash:.2f} GiB/s")
  host = jax.tree.map(np.asarray, jax.device_get(state))
  for name in ("crc32", "blake2b"):
    fn = (lambda b: zlib.crc32(b)) if name == "crc32" else (lambda b: hashlib.blake2b(b, digest_size=16).digest())
    t = _median(lambda: [fn(memoryview(np.ascontiguousarray(x)).cast("B")) for x in jax.tree.leaves(host)
                         if x.size], args.repeats)
    print(f"  {name} alone, one thread: {t:.2f} s = {nbytes / 2**30 / t:.2f} GiB/s")

  real_with_record = checksums.with_record
  real_verify = checksums.verify
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  for label, on in (("without", False), ("with", True)):
    checksums.with_record = real_with_record if on else (lambda items, data: dict(data))
    checksums.verify = real_verify if on else (lambda *a, **k: 0)
    calls, totals, restores = [], [], []
    for i in range(args.repeats):
      shutil.rmtree(args.dir, ignore_errors=True)
      mngr = checkpoint.checkpoint_manager(args.dir, keep=1, async_save=True)
      t = time.perf_counter()
      checkpoint.save_checkpoint(mngr, 1000, state, {"next_batch": 1000}, force=True)
      calls.append(time.perf_counter() - t)
      mngr.wait_until_finished()
      totals.append(time.perf_counter() - t)
      t = time.perf_counter()
      r = checkpoint.restore_checkpoint(mngr, abstract)
      jax.block_until_ready(r.state)
      restores.append(time.perf_counter() - t)
      mngr.close()
    print(f"save {label} checksums: call returns in {statistics.median(calls):.2f} s, written in "
          f"{statistics.median(totals):.2f} s; restore {statistics.median(restores):.2f} s "
          f"(median of {args.repeats})")
  checksums.with_record, checksums.verify = real_with_record, real_verify
  # The restore above includes the check that reads every array before orbax does; alone:
  shutil.rmtree(args.dir, ignore_errors=True)
  mngr = checkpoint.checkpoint_manager(args.dir, keep=1, async_save=False)
  checkpoint.save_checkpoint(mngr, 1000, state, {"next_batch": 1000}, force=True)
  mngr.close()
  step_dir = os.path.join(args.dir, "checkpoints", "1000")
  t = _median(lambda: checkpoint._read_every_array(step_dir), args.repeats)
  print(f"of which the read-every-array check: {t:.2f} s (median of {args.repeats})")
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
