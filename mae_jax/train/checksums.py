"""Content checksums of checkpoints: a CRC-32 of every saved array, written with it.

orbax stores arrays zstd-compressed without a content checksum, so a flipped bit in a data file
mostly decodes to a different, plausible array (a weight of -0.02 read back as -1e32) and a resume
would go on from it silently. Each save therefore records a digest of every array's bytes (taken
from the host copy of the state) and of the small JSON item in that JSON item itself, so the digests
are committed atomically with the arrays they describe. A restore recomputes them; any difference
is damage (`Mismatch`), handled like an unreadable checkpoint (set aside, the previous one used).

CRC-32 (zlib's, as gzip, zip and PNG use for the same purpose) catches every error of up to 32
consecutive bits and misses any other with probability 2^-32; it runs several times faster than
a cryptographic hash (BLAKE2b), which this job needs no more than it needs a defence against an
attacker who can write the workdir (docs/reliability.md has both speeds).

Checkpoints written before checksums existed carry none and restore unverified. Arrays that span
several processes (multi-host FSDP) are not whole on any one host and are not hashed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import zlib

import jax
import numpy as np

KEY = "checksums"  # inside the checkpoint's JSON item
ALGORITHM = "crc32"
_THREADS = max(1, min(8, os.cpu_count() or 1))  # zlib releases the GIL on large buffers


class Mismatch(ValueError):
  """A restored array (or the JSON item) differs from the digest saved with it."""


def _name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_name(path) -> str:
  """'state/params/blocks/0/attn/qkv/kernel': the same for a restored tree with or without a
  target (dataclass fields, dict keys and integer keys that orbax turns into strings)."""
  return "/".join(_name(k) for k in path)


def _digest(x: np.ndarray) -> str:
  x = np.ascontiguousarray(x)
  crc = zlib.crc32(f"{x.dtype.str}{x.shape}".encode())
  crc = zlib.crc32(memoryview(x).cast("B") if x.size else b"", crc)
  return f"{crc:08x}"


def _hashable(x) -> bool:
  return not isinstance(x, jax.Array) or x.is_fully_addressable


def _host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def arrays(tree, prefix: str = "") -> dict[str, str]:
  """{path name: digest} of every leaf of `tree` that is whole on this host."""
  leaves = [(prefix + path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if _hashable(x)]
  hosts = [(name, _host(x)) for name, x in leaves]
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    digests = list(pool.map(lambda item: _digest(item[1]), hosts))
  return {name: d for (name, _), d in zip(hosts, digests)}


def of_json(data) -> str:
  return f"{zlib.crc32(json.dumps(data, sort_keys=True).encode()):08x}"


def record(items: dict, data: dict) -> dict:
  """The digests of `items` ({item name: array tree}) and of `data` (the JSON item, without this
  record): what `save` puts under `KEY` in the JSON item."""
  sums = {}
  for item, tree in items.items():
    sums.update(arrays(tree, f"{item}/"))
  return {"algorithm": ALGORITHM, "arrays": sums, "data": of_json(data)}


def with_record(items: dict, data: dict) -> dict:
  """`data` plus its `KEY` record, ready to save as the JSON item."""
  data = dict(data)
  data.pop(KEY, None)
  return {**data, KEY: record(items, data)}


def split(data: dict | None) -> tuple[dict, dict | None]:
  """(the JSON item without the record, the record or None for a checkpoint saved without)."""
  data = dict(data or {})
  return data, data.pop(KEY, None)


def verify(saved: dict | None, items: dict, data: dict | None = None, *, only: str = "") -> int:
  """Raises `Mismatch` naming the first array (or the JSON item) whose digest differs from the
  saved record; `only`: check just the saved arrays whose name starts with it (a restore of one
  part of the state). Returns the number of arrays checked (0 without a record)."""
  if saved is None:
    return 0
  if saved.get("algorithm") != ALGORITHM:
    raise Mismatch(f"checksums of an unknown algorithm {saved.get('algorithm')!r}")
  if data is not None and of_json(data) != saved.get("data"):
    raise Mismatch("the JSON item differs from its checksum")
  now, whole = {}, True
  for item, tree in items.items():
    now.update(arrays(tree, f"{item}/"))
    whole = whole and all(_hashable(x) for x in jax.tree.leaves(tree))
  expected = {k: v for k, v in saved.get("arrays", {}).items() if k.startswith(only)}
  for name, digest in sorted(expected.items()):
    if name not in now:
      if only or whole:
        raise Mismatch(f"{name} has a checksum but was not restored")
      continue  # not whole on this host
    if now[name] != digest:
      raise Mismatch(f"{name} differs from its checksum (bit rot or a changed file)")
  return len(expected)
