"""USFM's released encoder: the BEiT-style ViT of openmedlab/USFM `configs/model/Cls/vit.yaml`, in
Flax NNX, numerically identical to timm's `Beit` with the same settings (tests/test_beit.py).

What differs from MAE's ViT (`vit.Encoder`):
  * no absolute position table: each block adds a learned relative position bias to its attention
    logits (BEiT's table of (2h−1)(2w−1) + 3 rows × heads: every (Δrow, Δcol) on the patch grid plus
    CLS→token, token→CLS, CLS→CLS), looked up through a fixed index;
  * the fused qkv projection has no bias of its own: a bias `q_bias` for q and `v_bias` for v, none
    for k (BEiT's `qkv_bias=True`, as USFM's `Attention` and timm's build it);
  * layer scale: the attention and MLP branches are multiplied by per-channel `gamma_1`, `gamma_2`
    (init 0.1 = USFM's `init_values`) before the residual add;
  * classification pools the mean patch token through `fc_norm` (USFM `use_mean_pooling`), which
    `heads.Classifier(global_pool='avg')` already does.

Pretraining may keep one relative position table shared by all blocks (`shared_rel_pos=True`, BEiT's
`use_shared_rel_pos_bias`): USFM's loader (`usdsgen/utils/modelutils.py::remap_pretrained_keys_vit`)
reads `rel_pos_bias.relative_position_bias_table` from every released checkpoint without checking
that it exists and copies it into each block, so the released weights carry one shared table.
Downstream encoders (`finetune_copy`) always have one table per block, initialised with that copy,
as USFM and BEiT fine-tune.

The MAE path (visible tokens only) works too: `transform(x, ids_keep=...)` gathers the bias rows
and columns of the kept tokens, which is what attending over the kept tokens of the full grid means.

Init (BEiT's): Linear kernels normal(0.02) (timm's trunc_normal_ at ±2 absolute is untruncated for
that std), zero biases, the attention output and fc2 kernels of block i divided by √(2(i+1)), CLS
normal(0.02), relative tables zero; the patch embedding's kernel normal(0.02) with a zero bias
(USFM's `_init_weights` re-initialises the patch Conv2d so, usdsgen/modules/backbone/vision_transformer.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import patches as patch_lib
from mae_jax.models import vit

INIT_STD = 0.02


def num_relative_distance(grid: tuple[int, int]) -> int:
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """(1 + h·w, 1 + h·w) int32 rows of the bias table for each (query, key) pair of [CLS, patches]:
  (Δrow + h − 1)·(2w − 1) + (Δcol + w − 1) between patches; the last three rows for CLS→token,
  token→CLS and CLS→CLS (BEiT's layout, so released tables index the same way)."""
  h, w = grid
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_row = rows[:, None] - rows[None, :] + h - 1
  d_col = cols[:, None] - cols[None, :] + w - 1
  n = num_relative_distance(grid)
  index = np.zeros((h * w + 1, h * w + 1), np.int32)
  index[1:, 1:] = d_row * (2 * w - 1) + d_col
  index[0, :] = n - 3
  index[:, 0] = n - 2
  index[0, 0] = n - 1
  return index


def relative_bias(table, grid: tuple[int, int], positions=None):
  """The attention bias of a (num_relative_distance, heads) table: (H, T, T) over [CLS, patches],
  or with `positions` (N, K) (sequence positions, CLS = 0) (N, H, K, K) for those tokens only."""
  index = relative_position_index(grid)
  if positions is None:
    t = index.shape[0]
    return jnp.transpose(table[index.reshape(-1)].reshape(t, t, -1), (2, 0, 1))
  idx = jnp.asarray(index)[positions[:, :, None], positions[:, None, :]]  # (N, K, K)
  return jnp.transpose(table[idx], (0, 3, 1, 2))


def resize_relative_table(table: np.ndarray, grid_in: tuple[int, int], grid_out: tuple[int, int]):
  """A (num_relative_distance, heads) table for another patch grid, as timm's
  `resize_rel_pos_bias_table` (BEiT's fine-tuning code) does it: the (2h−1)×(2w−1) part is
  resampled per head from geometrically spaced source offsets (denser near Δ = 0, where the bias
  varies most) to the integer target offsets, linearly (timm's interpolation without scipy; USFM's
  loader uses scipy's cubic one on the same points); the three CLS rows are kept."""
  from scipy.interpolate import RegularGridInterpolator

  table = np.asarray(table, np.float32)
  if tuple(grid_in) == tuple(grid_out):
    return table
  src = (2 * grid_in[0] - 1, 2 * grid_in[1] - 1)
  dst = (2 * grid_out[0] - 1, 2 * grid_out[1] - 1)
  body, extra = table[:-3], table[-3:]

  def coords(s, d):
    # Ratio q of a geometric progression whose s//2 steps from 1 reach d//2 (bisection, as BEiT).
    left, right = 1.01, 1.5
    while right - left > 1e-6:
      q = (left + right) / 2.0
      if (1.0 - q ** (s // 2)) / (1.0 - q) > d // 2:
        right = q
      else:
        left = q
    dis, cur = [], 1.0
    for i in range(s // 2):
      dis.append(cur)
      cur += q ** (i + 1)
    return np.asarray([-x for x in reversed(dis)] + [0.0] + dis)

  y, x = coords(src[0], dst[0]), coords(src[1], dst[1])
  ty, tx = dst[0] // 2, dst[1] // 2
  gy, gx = np.meshgrid(np.arange(-ty, ty + 0.1, 1.0), np.arange(-tx, tx + 0.1, 1.0), indexing="ij")
  # Targets beyond the outermost source offset take its value (timm's interpolator clamps).
  pts = np.stack([np.clip(gy.reshape(-1), y[0], y[-1]), np.clip(gx.reshape(-1), x[0], x[-1])], axis=-1)
  out = []
  for head in range(table.shape[1]):
    f = RegularGridInterpolator((y, x), body[:, head].reshape(src).astype(np.float64))
    out.append(f(pts))
  return np.concatenate([np.stack(out, axis=1).astype(np.float32), extra], axis=0)


def _linear(din, dout, *, use_bias=True, dtype, rngs):
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=nnx.initializers.normal(INIT_STD),
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32,
                    rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, dim, num_heads, *, grid=None, qkv_bias: bool = True, attention: str = "xla", dtype, rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.implementation = attention
    self.grid = tuple(grid) if grid else None
    self.qkv = _linear(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if qkv_bias else None
    self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if qkv_bias else None
    self.relative_position_bias_table = (
        nnx.Param(jnp.zeros((num_relative_distance(self.grid), num_heads), jnp.float32))
        if self.grid else None)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

  @jax.named_scope("attn")
  def __call__(self, x, shared_bias=None, positions=None):
    b, n, d = x.shape
    qkv = self.qkv(x)
    if self.q_bias is not None:
      zeros = jnp.zeros_like(self.q_bias[...])  # k has no bias
      qkv = qkv + jnp.concatenate([self.q_bias[...], zeros, self.v_bias[...]]).astype(qkv.dtype)
    bias = shared_bias
    if self.relative_position_bias_table is not None:
      own = relative_bias(self.relative_position_bias_table[...], self.grid, positions)
      bias = own if bias is None else bias + own
    qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
    out = vit.attention(qkv, implementation=self.implementation, bias=bias)
    return self.proj(out.reshape(b, n, d))


class Block(nnx.Module):
  """Pre-LN block with layer scale. Called like `vit.Block`: `blk(x, key)`; the encoder passes a
  shared bias and, on the MAE path, the kept tokens' sequence positions."""

  def __init__(self, dim, num_heads, mlp_ratio, *, grid=None, init_values: float = 0.1,
               qkv_bias: bool = True, drop_path_rate: float = 0.0, attention: str = "xla", dtype, rngs):
    self.norm1 = vit._norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, grid=grid, qkv_bias=qkv_bias, attention=attention, dtype=dtype,
                          rngs=rngs)
    self.norm2 = vit._norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = vit.Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.mlp.fc1 = _linear(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.mlp.fc2 = _linear(int(dim * mlp_ratio), dim, dtype=dtype, rngs=rngs)
    if init_values:
      self.gamma_1 = nnx.Param(jnp.full((dim,), init_values, jnp.float32))
      self.gamma_2 = nnx.Param(jnp.full((dim,), init_values, jnp.float32))
    else:
      self.gamma_1 = self.gamma_2 = None
    self.drop_path_rate = drop_path_rate

  def _scale(self, gamma, y):
    return y if gamma is None else y * gamma[...].astype(y.dtype)

  def __call__(self, x, key=None, shared_bias=None, positions=None, *, keep=None):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    y = self._scale(self.gamma_1, self.attn(self.norm1(x), shared_bias, positions))
    x = x + vit.drop_path(k1, y, self.drop_path_rate, keep)
    y = self._scale(self.gamma_2, self.mlp(self.norm2(x)))
    return x + vit.drop_path(k2, y, self.drop_path_rate, keep)


@dataclasses.dataclass(frozen=True)
class BeitOptions:
  init_values: float = 0.1  # layer scale init (0 = none)
  shared_rel_pos: bool = False  # one relative table for all blocks (pretraining) vs one per block
  qkv_bias: bool = True


class Encoder(nnx.Module):
  """The BEiT encoder, with `vit.Encoder`'s interface (`embed`, `embed_kept`, `cls`, `transform`,
  `__call__`, `spec`, `blocks`, `norm`) so that the MAE / SimMIM models and the downstream heads
  take either."""

  relative = True  # position information lives in the attention bias, not in the tokens

  def __init__(self, spec: vit.ViTSpec, *, options: BeitOptions = BeitOptions(),
               drop_path_rate: float = 0.0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.spec = spec
    self.options = options
    self.dtype = dtype
    self.patch_embed = vit.PatchEmbed(spec, dtype=dtype, rngs=rngs)
    # USFM's backbone re-initialises its patch Conv2d in `_init_weights` (trunc_normal 0.02, zero
    # bias), unlike MAE's xavier kernel and torch-default bias that `vit.PatchEmbed` starts from.
    self.patch_embed.proj = _linear(spec.patch_dim, spec.width, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(INIT_STD * jax.random.normal(rngs.params(), (1, 1, spec.width)))
    self.rel_pos_bias = (
        nnx.Param(jnp.zeros((num_relative_distance(spec.grid), spec.num_heads), jnp.float32))
        if options.shared_rel_pos else None)
    rates = np.linspace(0, drop_path_rate, spec.depth) if spec.depth else []
    self.drop_path_rates = tuple(float(r) for r in rates)

    def make(i, r):
      blk = Block(spec.width, spec.num_heads, spec.mlp_ratio, grid=None if options.shared_rel_pos else spec.grid,
                  init_values=options.init_values, qkv_bias=options.qkv_bias, drop_path_rate=r,
                  attention=spec.attention, dtype=dtype, rngs=rngs)
      for dense in (blk.attn.proj, blk.mlp.fc2):  # BEiT's fix_init_weight
        dense.kernel[...] = dense.kernel[...] / np.sqrt(2.0 * (i + 1))
      return blk

    self.blocks = vit.make_blocks(make, rates, spec.scan_layers)
    self.norm = vit._norm(spec.width, dtype=dtype, rngs=rngs)

  def embed(self, images):
    """Patch tokens (no CLS, no position: positions enter through the attention bias)."""
    return self.patch_embed(images.astype(self.dtype))

  def embed_kept(self, images, ids_keep):
    patches = patch_lib.patchify(images.astype(self.dtype), self.spec.patch_size)
    return self.patch_embed.proj(patch_lib.take_tokens(patches, ids_keep))

  def cls(self, batch: int):
    return jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (batch, 1, self.spec.width))

  def transform(self, x, *, key=None, return_intermediates: bool = False, ids_keep=None):
    """Blocks + final norm on [CLS, tokens]; `ids_keep` (N, K): the tokens are those patches
    (MAE path), else the whole grid."""
    positions = None
    if ids_keep is not None:
      positions = jnp.concatenate([jnp.zeros_like(ids_keep[:, :1]), ids_keep + 1], axis=1)
    expected = self.spec.num_patches + 1 if positions is None else positions.shape[1]
    if x.shape[1] != expected:
      raise ValueError(f"the BEiT encoder takes [CLS, patches] ({expected} tokens), got {x.shape[1]}: "
                       "extra prefix tokens (D²MAE blur_embed='token') have no relative position")
    x, feats = self.run(x, key=key, intermediates=return_intermediates, positions=positions)
    if self.norm is not None:
      x = self.norm(x)
    return (x, feats) if return_intermediates else x

  def run(self, x, *, key=None, intermediates: bool = False, positions=None):
    """The blocks alone (no final norm), as `vit.Encoder.run`; `positions` (N, K): the tokens'
    sequence positions (CLS = 0) on the MAE path."""
    shared = None
    if self.rel_pos_bias is not None:
      shared = relative_bias(self.rel_pos_bias[...], self.spec.grid, positions)
    return vit.run_blocks(self.blocks, x, key, shared, positions, rates=self.drop_path_rates,
                          remat=self.spec.remat, intermediates=intermediates)

  __call__ = vit.Encoder.__call__  # [CLS, patches] -> transform, through this class's embed/cls/transform

  def finetune_copy(self, *, drop_path: float = 0.0, seed: int = 0, depth: int | None = None,
                    image_size: int | None = None, keep_norm: bool = True, run: dict | None = None) -> Encoder:
    """A downstream encoder with these weights: one relative table per block (a shared pretraining
    table is copied into every block, as USFM's loader does), stochastic depth `drop_path` (the
    full-depth linear ramp), optionally only the first `depth` blocks (segmentation) and another
    image size (each table resized by `resize_relative_table`)."""
    depth = self.spec.depth if depth is None else int(depth)
    spec = vit.downstream_spec(self.spec, depth, image_size, run)
    opts = dataclasses.replace(self.options, shared_rel_pos=False)
    dst = Encoder(spec, options=opts, dtype=self.dtype, rngs=nnx.Rngs(seed))
    src = vit.unstack_blocks(nnx.to_pure_dict(nnx.state(self)))
    shared = src.pop("rel_pos_bias", None)
    blocks = {}
    for i in range(depth):
      b = src["blocks"][i]
      table = b["attn"].get("relative_position_bias_table", shared)
      b["attn"]["relative_position_bias_table"] = jnp.asarray(
          resize_relative_table(np.asarray(table), self.spec.grid, spec.grid))
      blocks[i] = b
    src["blocks"] = blocks
    if not keep_norm:
      src.pop("norm", None)
      dst.norm = None
    return vit.load_weights(dst, src, drop_path=drop_path, full_depth=self.spec.depth)
