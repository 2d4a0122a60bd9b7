"""Patch masking: MAE's random token dropping and USFM's spatial mean masking."""

import jax
import jax.numpy as jnp

from mae_jax import patches


def num_kept(num_patches: int, mask_ratio: float) -> int:
  # The official model uses int(L * (1 - ratio)): truncation, not rounding.
  return int(num_patches * (1 - mask_ratio))


def shuffle_from_noise(noise):
  """Per-sample permutation from uniform noise: small noise = kept first (as in MAE).

  Returns (ids_shuffle, ids_restore), both int32 (N, L). ids_restore is the inverse permutation,
  computed with a scatter instead of a second argsort.
  """
  n, length = noise.shape
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ar = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
  ids_restore = jnp.zeros_like(ids_shuffle).at[jnp.arange(n)[:, None], ids_shuffle].set(ar)
  return ids_shuffle, ids_restore


def keep_indices(noise, mask_ratio: float):
  """MAE's token selection from noise (N, L), without touching any tokens.

  Returns (ids_keep (N, len_keep) int32, mask (N, L) bool with True = removed, ids_restore (N, L)).
  """
  len_keep = num_kept(noise.shape[1], mask_ratio)
  ids_shuffle, ids_restore = shuffle_from_noise(noise)
  # mask in shuffled order is [0]*keep + [1]*rest; unshuffling it is a comparison of ranks.
  return ids_shuffle[:, :len_keep], ids_restore >= len_keep, ids_restore


def removed_indices(noise, mask_ratio: float):
  """The removed (masked) patch indices (N, L - len_keep) int32, in MAE's shuffled order: the
  patches where `keep_indices`' mask is True."""
  return shuffle_from_noise(noise)[0][:, num_kept(noise.shape[1], mask_ratio):]


def random_masking(x, mask_ratio: float, noise):
  """MAE random masking of tokens x (N, L, D) driven by noise (N, L).

  Returns (x_kept (N, len_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L)).
  """
  ids_keep, mask, ids_restore = keep_indices(noise, mask_ratio)
  x_kept = patches.take_tokens(x, ids_keep)
  return x_kept, mask.astype(x.dtype), ids_restore


def random_mask_from_key(key, batch: int, num_patches: int):
  """Uniform noise for `random_masking`, drawn from a key."""
  return jax.random.uniform(key, (batch, num_patches), dtype=jnp.float32)
