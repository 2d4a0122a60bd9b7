"""A compact ViT in Flax NNX, numerically identical to timm's `VisionTransformer` as used by MAE.

Details that matter for parity with facebookresearch/mae `models_mae.py` (docs/methods.md#mae):
fused qkv with bias, exact erf GELU, pre-LN blocks, LayerNorm eps 1e-6, xavier_uniform Linear
kernels with zero biases, the patch-embedding bias left at torch Conv2d's default init, MAE's 2-D
sin-cos table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import cpu_kernels
from mae_jax import patches as patch_lib
from mae_jax.presets import PRESETS  # noqa: F401  (vit.PRESETS, as before)

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


_INV_SQRT2 = float(1.0 / np.sqrt(2.0))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_vjp
def gelu_exact(x):
  """Exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)), as torch's nn.GELU computes it (float32 inside).

  Flax's default gelu is the tanh approximation; `jax.nn.gelu(approximate=False)` is exact but goes
  through erfc, whose XLA:CPU expansion is ~6x slower than erf's (forward on a 6304 x 1024
  activation). The backward, dy·(Φ(x) + x·φ(x)), recomputes Φ from x in the same pass instead of
  saving it, so nothing but x is kept for it (see `_gelu_bwd` for how that survives XLA's CSE).
  """
  return _gelu_fwd(x)[0]


def _gelu_fwd(x):
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * _INV_SQRT2))).astype(x.dtype), x


def _gelu_bwd(x, dy):
  x32 = x.astype(jnp.float32)
  # Φ(x) as 1 − erf(−x/√2) (XLA's erf is exactly odd, so the value is the same): written as in the
  # forward, XLA merges the two erf (CSE), stores erf(x/√2) for the backward and splits the forward
  # GELU into two passes over the MLP activations; recomputing it here is ~2% of a ViT-S MAE step
  # faster on CPU (docs/benchmarks.md).
  cdf = 0.5 * (1.0 - jax.lax.erf(-x32 * _INV_SQRT2))
  pdf = jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return ((dy.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


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


def matmul_2d(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  """`lax.dot_general` for Linear's `x[..., K] @ W[K, N]`, computed as one 2-D matmul.

  Why: on (B, L, D) activations the weight gradient contracts over (B, L), and XLA:CPU then writes a
  transposed copy of the output gradient (re-running the fusion that produced it) before each
  weight-gradient dot. On (B·L, D) the backward is a plain xᵀ·dy that reads both operands in place.
  Same products and sums, so the results do not change.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if (lhs.ndim < 2 or rhs.ndim != 2 or lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,)
      or kwargs.get("out_sharding") is not None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
  kwargs.pop("out_sharding", None)
  x = lhs.reshape(-1, lhs.shape[-1])
  if (lhs.dtype == rhs.dtype == jnp.float32 and kwargs.get("preferred_element_type") in (None, jnp.float32)
      and cpu_kernels.use_for_matmul()):
    out = cpu_kernels.dense(x, rhs)  # sgemm by MKL/OpenBLAS on a CPU (mae_jax/cpu_kernels)
  else:
    out = jax.lax.dot_general(x, rhs, (((1,), (0,)), ((), ())), precision=precision, **kwargs)
  return out.reshape(*lhs.shape[:-1], rhs.shape[1])


def _dense(din, dout, *, dtype, rngs, kernel_init=None, bias_init=None):
  return nnx.Linear(din, dout, kernel_init=kernel_init or nnx.initializers.xavier_uniform(),
                    bias_init=bias_init or nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=jnp.float32, dot_general=matmul_2d, rngs=rngs)


def conv_default_bias_init(fan_in: int):
  """torch `nn.Conv2d`'s default bias init, U(−1/√fan_in, 1/√fan_in) with fan_in = C·p·p."""
  bound = 1.0 / float(np.sqrt(fan_in))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
  """LayerNorm over the last axis, (x − mean)/sqrt(var + eps)·scale + bias, statistics in float32.

  The backward is written out so that XLA:CPU runs it as a few elementwise passes, two matrix-vector
  products (the row sums that involve `scale`) and column sums: autodiff of flax's LayerNorm puts
  the row sums into library (YNNPACK) fusions that take `scale` as a materialised tokens × width
  broadcast, one per LayerNorm and step (~4% of a ViT-S MAE step on CPU, docs/benchmarks.md).
  Only x's row mean and 1/std are saved (x itself is the residual stream, alive anyway).
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  xc = x32 - mean
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  y = xc * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, res, dy):
  x, mean, rstd, scale, bias = res
  d = x.shape[-1]
  x2 = x.reshape(-1, d).astype(jnp.float32)
  dy2 = dy.reshape(-1, d).astype(jnp.float32)
  rstd2, s32 = rstd.reshape(-1, 1), scale.astype(jnp.float32)
  xhat = (x2 - mean.reshape(-1, 1)) * rstd2
  dy_xhat = dy2 * xhat
  # dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·scale; the two row means as matvecs.
  mean_g = (dy2 @ s32)[:, None] / d
  mean_gx = (dy_xhat @ s32)[:, None] / d
  dx = rstd2 * (dy2 * s32 - mean_g - xhat * mean_gx)
  dscale = jnp.sum(dy_xhat, axis=0).astype(scale.dtype)
  dbias = jnp.sum(dy2, axis=0).astype(bias.dtype)
  return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` (same parameters, init and state layout) computed by `layer_norm`."""

  def __call__(self, x, *, mask=None):
    if mask is not None or self.scale is None or self.bias is None:
      return super().__call__(x, mask=mask)
    y = layer_norm(x, self.scale[...], self.bias[...], self.epsilon)
    return y if self.dtype is None else y.astype(self.dtype)


def _norm(dim, *, dtype, rngs):
  return LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Patch embedding as one matmul on patchified pixels (equal to timm's stride-p conv)."""

  def __init__(self, spec: ViTSpec, *, dtype, rngs):
    self.patch_size = spec.patch_size
    # xavier on the (p*p*C, D) view, as MAE initialises its conv weight viewed as a matrix. The bias
    # keeps Conv2d's default: MAE's `initialize_weights` re-initialises only the conv weight, and its
    # `_init_weights` touches nn.Linear and nn.LayerNorm, not the conv.
    self.proj = _dense(spec.patch_dim, spec.width, dtype=dtype, rngs=rngs,
                       bias_init=conv_default_bias_init(spec.patch_dim))

  def __call__(self, images):
    return self.proj(patch_lib.patchify(images, self.patch_size))


class Attention(nnx.Module):

  def __init__(self, dim, num_heads, *, dtype, rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.qkv = _dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _dense(dim, dim, dtype=dtype, rngs=rngs)

  @jax.named_scope("attn")  # names the ops in profiles (docs/benchmarks.md)
  def __call__(self, x, rows=None):
    """rows (N, R): the output at these token indices only (every token is still a key/value)."""
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    out = attention(qkv).reshape(b, n, d)
    return self.proj(out if rows is None else patch_lib.take_tokens(out, rows))


def attention(qkv):
  """Multi-head softmax(q·kᵀ/√hd)·v of a fused projection qkv (B, T, 3, H, hd) -> (B, T, H, hd).

  On GPU: `jax.nn.dot_product_attention` (cuDNN's fused flash attention for 16-bit inputs).
  On a one-device CPU in float32: `cpu_kernels.attention`, one fused custom call per direction that
  reads qkv in place. Elsewhere (bf16 on CPU, sharded CPU meshes) `_attention_core`, an explicit form with a written-out backward that XLA:CPU runs
  faster than autodiff or the XLA path of `jax.nn.dot_product_attention` (docs/benchmarks.md):
  q, k, v each copied once to head-major (B, H, T, hd), the 1/√hd scale folded into that copy of q
  (T·hd values, not T·T). The logits, softmax and its sums are float32 for any compute dtype.
  """
  if jax.default_backend() == "gpu":
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    hd = q.shape[-1]
    if q.dtype in (jnp.bfloat16, jnp.float16) and hd % 8 == 0 and hd <= 128:
      try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
      except Exception:  # cuDNN missing or too old (checked while tracing): the XLA path
        pass
    return jax.nn.dot_product_attention(q, k, v)
  if qkv.dtype == jnp.float32 and cpu_kernels.use_for_attention():
    return cpu_kernels.attention(qkv, qkv.shape[-1] ** -0.5)
  scale = jnp.asarray(qkv.shape[-1] ** -0.5, qkv.dtype)
  q = jnp.transpose(qkv[:, :, 0], (0, 2, 1, 3)) * scale  # (B, H, T, hd), one strided copy each
  k = jnp.transpose(qkv[:, :, 1], (0, 2, 1, 3))
  v = jnp.transpose(qkv[:, :, 2], (0, 2, 1, 3))
  return jnp.transpose(_attention_core(q, k, v), (0, 2, 1, 3))


@jax.custom_vjp
def _attention_core(q, k, v):
  """softmax(q·kᵀ)·v on head-major (B, H, T, hd) inputs, q already scaled."""
  return _attention_core_fwd(q, k, v)[0]


def _attention_core_fwd(q, k, v):
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
  # Any per-row constant cancels in the softmax; subtracting the max only guards exp's range.
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  # Normalised on the (T, hd) output instead of the (T, T) probabilities.
  out = jnp.einsum("bhts,bhsd->bhtd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
  out = out.astype(v.dtype)
  return out, (q, k, v, out, m, denom)


def _attention_core_bwd(res, dout):
  """The softmax backward, with every matmul in the operand layout XLA:CPU's fast (YNNPACK) dots
  take: a dot whose left operand is contracted over a non-minor axis (pᵀ·dout, dsᵀ·q in the
  textbook form) falls back to a generic kernel ~5x slower, so dv and dk are computed transposed,
  (doutᵀ·p)ᵀ and (qᵀ·ds)ᵀ, transposing the small (T, hd) operands instead of the (T, T) ones.
  p is recomputed from q and k (XLA shares it with the forward's when both are in one program)."""
  q, k, v, out, m, denom = res
  f32 = jnp.float32
  logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=f32)
  p = jnp.exp(logits - m) / denom
  dout32 = dout.astype(f32)
  dp = jnp.einsum("bhtd,bhsd->bhts", dout, v, preferred_element_type=f32)
  delta = jnp.sum(dout32 * out.astype(f32), axis=-1, keepdims=True)  # rowsum(p·dp) = rowsum(dout·out)
  ds = p * (dp - delta)
  dq = jnp.einsum("bhts,bhsd->bhtd", ds.astype(k.dtype), k, preferred_element_type=f32)
  dk_t = jnp.einsum("bhdt,bhts->bhds", jnp.swapaxes(q, 2, 3), ds.astype(q.dtype), preferred_element_type=f32)
  dv_t = jnp.einsum("bhdt,bhts->bhds", jnp.swapaxes(dout, 2, 3), p.astype(dout.dtype),
                    preferred_element_type=f32)
  return (dq.astype(q.dtype), jnp.swapaxes(dk_t, 2, 3).astype(k.dtype),
          jnp.swapaxes(dv_t, 2, 3).astype(v.dtype))


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


class Mlp(nnx.Module):

  def __init__(self, dim, hidden, *, dtype, rngs):
    self.fc1 = _dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _dense(hidden, dim, dtype=dtype, rngs=rngs)

  @jax.named_scope("mlp")
  def __call__(self, x):
    # On (tokens, width): between the two matmuls XLA:CPU then fuses bias, GELU and the layout of
    # the hidden activations into one pass (a 3-D hidden costs an extra pass; see matmul_2d).
    h = gelu_exact(self.fc1(x.reshape(-1, x.shape[-1])))
    return self.fc2(h).reshape(x.shape)


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

  def __call__(self, x, key=None, rows=None):
    """rows (N, R): the block's output at these token indices only, (N, R, D). The same numbers as
    `patch_lib.take_tokens(block(x), rows)`: attention still reads every token as key and value, and all that
    follows it (projection, residuals, MLP) acts on each token alone, so it runs on R rows."""
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    a = self.attn(self.norm1(x), rows=rows)
    x = (x if rows is None else patch_lib.take_tokens(x, rows)) + drop_path(k1, a, self.drop_path_rate)
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

  def embed_kept(self, images, ids_keep):
    """`embed(images)` at the token indices ids_keep (N, K) only: (N, K, D).

    The patch projection and the position rows act on each token alone, so picking the kept
    patches first gives the same tokens while MAE (K = L/4) embeds a quarter of them.
    """
    patches = patch_lib.patchify(images.astype(self.dtype), self.spec.patch_size)
    patches = patch_lib.take_tokens(patches, ids_keep)
    pos = jnp.take(self.pos_embed[...][0, 1:], ids_keep, axis=0)
    return self.patch_embed.proj(patches) + pos.astype(self.dtype)

  def cls(self, batch: int):
    tok = (self.cls_token[...] + self.pos_embed[...][:, :1]).astype(self.dtype)
    return jnp.broadcast_to(tok, (batch, 1, self.spec.width))

  def transform(self, x, *, key=None, return_intermediates: bool = False):
    """Runs the blocks and the final norm. Intermediates are the block outputs (before norm)."""
    x, feats = run_blocks(self.blocks, x, key)
    x = self.norm(x)
    return (x, feats) if return_intermediates else x

  def __call__(self, images, *, key=None, return_intermediates: bool = False):
    """Plain ViT forward on all patches: [CLS, patches] -> normed tokens."""
    x = self.embed(images)
    x = jnp.concatenate([self.cls(x.shape[0]), x], axis=1)
    return self.transform(x, key=key, return_intermediates=return_intermediates)


def run_blocks(blocks, x, key, *block_args):
  """x through every block (`blk(x, key_i, *block_args)`, one stochastic-depth key each): the last
  output and every block's output (the intermediates probes and UperNet read)."""
  feats = []
  keys = jax.random.split(key, len(blocks)) if key is not None else [None] * len(blocks)
  for blk, k in zip(blocks, keys):
    x = blk(x, k, *block_args)
    feats.append(x)
  return x, feats


def downstream_spec(spec: ViTSpec, depth: int, image_size: int | None) -> ViTSpec:
  """`spec` with `depth` blocks at `image_size` (default: the pretraining size), for a downstream copy."""
  image_size = int(image_size or spec.image_size)
  if image_size % spec.patch_size:
    raise ValueError(f"model.image_size={image_size} is not a multiple of the patch size {spec.patch_size}")
  return dataclasses.replace(spec, depth=int(depth), image_size=image_size)


def load_weights(dst, pure: dict, *, drop_path: float, full_depth: int):
  """Writes `pure` (an `nnx.to_pure_dict` of a pretrained encoder, already cut and resized to dst's
  shapes) into `dst`, and gives dst's blocks the stochastic-depth rates of timm's linear ramp over
  the full pretrained depth (a truncated copy keeps the rates of its first blocks)."""
  state = nnx.state(dst)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(dst, state)
  rates = np.linspace(0, drop_path, full_depth) if full_depth else []
  for blk, r in zip(dst.blocks, rates):
    blk.drop_path_rate = float(r)
  return dst
