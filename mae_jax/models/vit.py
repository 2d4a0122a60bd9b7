"""A compact ViT in Flax NNX, numerically identical to timm's `VisionTransformer` as used by MAE.

Details that matter for parity with facebookresearch/mae (see SPEC §1): fused qkv with bias, exact
erf GELU, pre-LN blocks, LayerNorm eps 1e-6, xavier_uniform Linear kernels, MAE's 2-D sin-cos table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import patches as patch_lib

# (width, depth, heads, patch) of the standard ViT sizes; `tiny` and `micro` are for tests and smoke runs.
PRESETS = {
    "micro": (32, 2, 2, 8),
    "tiny": (64, 4, 4, 8),
    "ti": (192, 12, 3, 16),
    "s": (384, 12, 6, 16),
    "b": (768, 12, 12, 16),
    "l": (1024, 24, 16, 16),
    "h": (1280, 32, 16, 14),
}

LN_EPS = 1e-6


class FixedPosEmbed(nnx.Variable):
  """A position table that is not trained (MAE pretraining keeps the sin-cos table frozen)."""


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  if dim % 2:
    raise ValueError(f"sin-cos embedding width must be even, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_hw: tuple[int, int], num_prefix: int = 1) -> np.ndarray:
  """MAE's table: first half of the channels encodes the column, second half the row.

  Returns (num_prefix + h*w, dim) float32 with zero rows for the prefix tokens (CLS, ...).
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
  h, w = grid_hw
  cols, rows = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  emb = np.concatenate([np.zeros((num_prefix, dim)), emb], axis=0)
  return emb.astype(np.float32)


def gelu_exact(x):
  # Flax's default gelu is the tanh approximation; torch's nn.GELU is erf.
  return jax.nn.gelu(x, approximate=False)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  image_size: int = 224
  patch_size: int = 16
  in_chans: int = 1
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size // self.patch_size, self.image_size // self.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2 * self.in_chans

  @classmethod
  def from_preset(cls, name: str, *, image_size: int, in_chans: int, patch_size: int | None = None):
    if name not in PRESETS:
      raise ValueError(f"model.variant={name!r}: expected one of {sorted(PRESETS)}")
    width, depth, heads, patch = PRESETS[name]
    return cls(image_size=image_size, patch_size=patch_size or patch, in_chans=in_chans,
               width=width, depth=depth, num_heads=heads)


def _dense(din, dout, *, dtype, rngs, kernel_init=None):
  return nnx.Linear(din, dout, kernel_init=kernel_init or nnx.initializers.xavier_uniform(),
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def _norm(dim, *, dtype, rngs):
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Patch embedding as one matmul on patchified pixels (equal to timm's stride-p conv)."""

  def __init__(self, spec: ViTSpec, *, dtype, rngs):
    self.patch_size = spec.patch_size
    # xavier on the (p*p*C, D) view, as MAE initialises its conv weight viewed as a matrix.
    self.proj = _dense(spec.patch_dim, spec.width, dtype=dtype, rngs=rngs)

  def __call__(self, images):
    return self.proj(patch_lib.patchify(images, self.patch_size))


class Attention(nnx.Module):

  def __init__(self, dim, num_heads, *, dtype, rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.qkv = _dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _dense(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, hd): the layout XLA/cuDNN want
    out = jax.nn.dot_product_attention(q, k, v)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):

  def __init__(self, dim, hidden, *, dtype, rngs):
    self.fc1 = _dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _dense(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(gelu_exact(self.fc1(x)))


def drop_path(key, x, rate: float):
  """Stochastic depth: drop the whole residual branch per sample."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nnx.Module):

  def __init__(self, dim, num_heads, mlp_ratio, *, drop_path_rate=0.0, dtype, rngs):
    self.norm1 = _norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path_rate = drop_path_rate

  def __call__(self, x, key=None):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    x = x + drop_path(k1, self.attn(self.norm1(x)), self.drop_path_rate)
    x = x + drop_path(k2, self.mlp(self.norm2(x)), self.drop_path_rate)
    return x


class Encoder(nnx.Module):
  """ViT encoder pieces. `embed` and `transform` are separate so callers can mask in between."""

  def __init__(self, spec: ViTSpec, *, drop_path_rate: float = 0.0, learnable_pos: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.spec = spec
    self.dtype = dtype
    self.patch_embed = PatchEmbed(spec, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, spec.width)))
    table = jnp.asarray(sincos_2d(spec.width, spec.grid, num_prefix=1))[None]
    # Fine-tuning trains the table (as timm/MAE fine-tuning do); pretraining keeps it fixed.
    self.pos_embed = nnx.Param(table) if learnable_pos else FixedPosEmbed(table)
    # Linearly increasing stochastic depth, as timm.
    rates = np.linspace(0, drop_path_rate, spec.depth) if spec.depth else []
    self.blocks = nnx.List([
        Block(spec.width, spec.num_heads, spec.mlp_ratio, drop_path_rate=float(r), dtype=dtype, rngs=rngs)
        for r in rates
    ])
    self.norm = _norm(spec.width, dtype=dtype, rngs=rngs)

  def embed(self, images):
    """Patch tokens + their position rows (no CLS): (N, L, D)."""
    return self.patch_embed(images.astype(self.dtype)) + self.pos_embed[...][:, 1:].astype(self.dtype)

  def cls(self, batch: int):
    tok = (self.cls_token[...] + self.pos_embed[...][:, :1]).astype(self.dtype)
    return jnp.broadcast_to(tok, (batch, 1, self.spec.width))

  def transform(self, x, *, key=None, return_intermediates: bool = False):
    """Runs the blocks and the final norm. Intermediates are the block outputs (before norm)."""
    feats = []
    keys = jax.random.split(key, len(self.blocks)) if key is not None else [None] * len(self.blocks)
    for blk, k in zip(self.blocks, keys):
      x = blk(x, k)
      if return_intermediates:
        feats.append(x)
    x = self.norm(x)
    return (x, feats) if return_intermediates else x

  def __call__(self, images, *, key=None, return_intermediates: bool = False):
    """Plain ViT forward on all patches: [CLS, patches] -> normed tokens."""
    x = self.embed(images)
    x = jnp.concatenate([self.cls(x.shape[0]), x], axis=1)
    return self.transform(x, key=key, return_intermediates=return_intermediates)
