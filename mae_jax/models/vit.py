"""A compact ViT in Flax NNX, numerically identical to timm's `VisionTransformer` as used by MAE.

Details that matter for parity with facebookresearch/mae `models_mae.py` (docs/methods.md#mae):
fused qkv with bias, exact erf GELU, pre-LN blocks, LayerNorm eps 1e-6, xavier_uniform Linear
kernels with zero biases, the patch-embedding bias left at torch Conv2d's default init, MAE's 2-D
sin-cos table.

How the blocks run is a config choice that changes no number: `jax.nn.dot_product_attention`'s
implementation (`ViTSpec.attention`), rematerialisation (`remat`) and big_vision's scanned layout
(`scan_layers`: one block module whose parameters are stacked on a leading axis, run under
`nnx.scan`). `unstack_blocks` / `stack_blocks` convert parameter trees between the layouts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import patches as patch_lib
from mae_jax.presets import PRESETS  # noqa: F401  (vit.PRESETS, as before)

LN_EPS = 1e-6

# `implementation` of jax.nn.dot_product_attention: XLA's own ops run on every backend; cuDNN's fused
# attention exists only on NVIDIA GPUs (16-bit inputs, head dim a multiple of 8 up to 128).
ATTENTION = ("xla", "cudnn")
# jax.checkpoint_policies that are policies themselves (the others are factories taking names).
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
# The per-block modules an encoder or decoder keeps (one nnx.List entry per block, or one stacked
# block when scanned); `unstack_blocks` / `stack_blocks` convert parameter trees between the two.
BLOCK_KEYS = ("blocks", "decoder_blocks")


def remat_policy(name: str):
  """`model.remat` as (remat?, policy): none = no remat, full = save nothing (recompute the whole
  block in the backward), else the named jax.checkpoint_policies entry."""
  if name == "none":
    return False, None
  if name == "full":
    return True, None
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat={name!r}: expected 'none', 'full' or one of {list(REMAT_POLICIES)}")
  return True, getattr(jax.checkpoint_policies, name)


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


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  image_size: int = 224
  patch_size: int = 16
  in_chans: int = 1
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  # How the blocks run, not what they compute (the same numbers either way; see `run_blocks`).
  attention: str = "xla"  # jax.nn.dot_product_attention's implementation: xla | cudnn (GPU only)
  remat: str = "none"  # none | full | a jax.checkpoint_policies name (REMAT_POLICIES)
  scan_layers: bool = False  # blocks stacked on a leading axis and run under nnx.scan

  def __post_init__(self):
    if self.attention not in ATTENTION:
      raise ValueError(f"model.attention={self.attention!r}: expected one of {list(ATTENTION)}")
    remat_policy(self.remat)

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
  def from_preset(cls, name: str, *, image_size: int, in_chans: int, patch_size: int | None = None,
                  **run):
    if name not in PRESETS:
      raise ValueError(f"model.variant={name!r}: expected one of {sorted(PRESETS)}")
    width, depth, heads, patch = PRESETS[name]
    return cls(image_size=image_size, patch_size=patch_size or patch, in_chans=in_chans,
               width=width, depth=depth, num_heads=heads, **run)


def _dense(din, dout, *, dtype, rngs, kernel_init=None, bias_init=None):
  return nnx.Linear(din, dout, kernel_init=kernel_init or nnx.initializers.xavier_uniform(),
                    bias_init=bias_init or nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def conv_default_bias_init(fan_in: int):
  """torch `nn.Conv2d`'s default bias init, U(−1/√fan_in, 1/√fan_in) with fan_in = C·p·p."""
  bound = 1.0 / float(np.sqrt(fan_in))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _norm(dim, *, dtype, rngs):
  # Two-pass variance, as torch's LayerNorm (flax's default E[x²] − E[x]² loses digits).
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


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


def attention(qkv, *, implementation: str = "xla", bias=None):
  """softmax(q·kᵀ/√hd + bias)·v of a fused projection qkv (B, T, 3, H, hd) -> (B, T, H, hd), by
  `jax.nn.dot_product_attention` (logits and softmax in float32 for any compute dtype). bias:
  (H, T, T) or (B, H, T, T), added to the logits (BEiT's relative positions)."""
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if bias is not None:
    bias = bias if bias.ndim == 4 else bias[None]
    # XLA adds a float32 bias to its float32 logits; cuDNN takes the bias in the inputs' dtype.
    bias = bias.astype(q.dtype if implementation == "cudnn" else jnp.float32)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


class Attention(nnx.Module):

  def __init__(self, dim, num_heads, *, attention: str = "xla", dtype, rngs):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.implementation = attention
    self.qkv = _dense(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _dense(dim, dim, dtype=dtype, rngs=rngs)

  @jax.named_scope("attn")  # names the ops in profiles (docs/benchmarks.md)
  def __call__(self, x, rows=None):
    """rows (N, R): the output at these token indices only (every token is still a key/value)."""
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    out = attention(qkv, implementation=self.implementation).reshape(b, n, d)
    return self.proj(out if rows is None else patch_lib.take_tokens(out, rows))


class Mlp(nnx.Module):

  def __init__(self, dim, hidden, *, dtype, rngs):
    self.fc1 = _dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _dense(hidden, dim, dtype=dtype, rngs=rngs)

  @jax.named_scope("mlp")
  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # torch's exact erf GELU


def drop_path(key, x, rate: float, keep=None):
  """Stochastic depth: drop the whole residual branch per sample. `keep` (a traced 1 − rate, the
  scanned blocks' per-block value) replaces the Python float `rate` when given."""
  if key is None or (keep is None and rate == 0.0):
    return x
  keep = 1.0 - rate if keep is None else keep
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nnx.Module):

  def __init__(self, dim, num_heads, mlp_ratio, *, drop_path_rate=0.0, attention: str = "xla", dtype, rngs):
    self.norm1 = _norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, attention=attention, dtype=dtype, rngs=rngs)
    self.norm2 = _norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path_rate = drop_path_rate

  def __call__(self, x, key=None, rows=None, *, keep=None):
    """rows (N, R): the block's output at these token indices only, (N, R, D). The same numbers as
    `patch_lib.take_tokens(block(x), rows)`: attention still reads every token as key and value, and all that
    follows it (projection, residuals, MLP) acts on each token alone, so it runs on R rows.
    keep: the traced keep probability of stochastic depth (scanned blocks; see `drop_path`)."""
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    a = self.attn(self.norm1(x), rows=rows)
    x = (x if rows is None else patch_lib.take_tokens(x, rows)) + drop_path(k1, a, self.drop_path_rate, keep)
    x = x + drop_path(k2, self.mlp(self.norm2(x)), self.drop_path_rate, keep)
    return x


def make_blocks(make, rates, scan: bool):
  """Blocks `make(i, rate)` for each stochastic-depth rate: an `nnx.List`, or with `scan` one block
  whose every parameter is the per-block ones stacked on a leading axis (big_vision's scanned
  layout). Both draw the same initial values (the blocks are built one by one, then stacked)."""
  blocks = [make(i, float(r)) for i, r in enumerate(rates)]
  if not scan or not blocks:
    return nnx.List(blocks)
  states = [nnx.state(b) for b in blocks]
  return nnx.merge(nnx.graphdef(blocks[0]), jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def is_scanned(blocks) -> bool:
  return not isinstance(blocks, nnx.List)


def block_list(blocks) -> list:
  """The blocks one by one, whichever the layout (a scanned stack is sliced into per-block modules)."""
  if not is_scanned(blocks):
    return list(blocks)
  graphdef, state = nnx.split(blocks)
  depth = jax.tree.leaves(state)[0].shape[0]
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(depth)]


def slice_blocks(blocks, start: int, stop: int):
  """Blocks [start, stop) in the same layout (a scanned stack stays stacked)."""
  if not is_scanned(blocks):
    return nnx.List(list(blocks)[start:stop])
  graphdef, state = nnx.split(blocks)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


def num_blocks(blocks) -> int:
  return jax.tree.leaves(nnx.state(blocks))[0].shape[0] if is_scanned(blocks) else len(blocks)


def run_blocks(blocks, x, key, *block_args, rates=None, remat: str = "none", intermediates: bool = True):
  """x through every block (`blk(x, key_i, *block_args)`, one stochastic-depth key each): the last
  output and, with `intermediates`, every block's output (probes and UperNet read them).

  A scanned stack (`make_blocks(scan=True)`) runs under `nnx.scan` with the per-block keep
  probabilities 1 − `rates` as a scanned input (so stochastic depth still differs per block);
  `remat` wraps each block in `nnx.remat` with that policy (see `remat_policy`). Both give the same
  loss and gradients as the plain loop (tests/test_scan_remat.py)."""
  do_remat, policy = remat_policy(remat)

  def call(blk, h, k, keep):
    return blk(h, k, *block_args, keep=keep)

  if do_remat:
    call = nnx.remat(call, policy=policy)
  if not is_scanned(blocks):
    feats = []
    keys = jax.random.split(key, len(blocks)) if key is not None else [None] * len(blocks)
    for blk, k in zip(blocks, keys):
      x = call(blk, x, k, None)
      feats.append(x)
    return x, (feats if intermediates else [])
  depth = num_blocks(blocks)
  if not depth:
    return x, []
  keys = jax.random.split(key, depth) if key is not None else None
  keep = None
  if key is not None:
    rates = np.zeros(depth) if rates is None else np.asarray(rates, np.float64)
    keep = jnp.asarray(1.0 - rates, jnp.float32)

  @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
  def body(h, blk, k, kp):
    h = call(blk, h, k, kp)
    return h, (h if intermediates else None)

  x, ys = body(x, blocks, keys, keep)
  return x, ([ys[i] for i in range(depth)] if intermediates else [])


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def stacked_axes(path) -> int:
  """1 where a pytree path (`jax.tree_util.tree_map_with_path`) runs through a scanned block stack
  (its leaves carry one leading block axis), else 0: per-parameter rules that look at a leaf's rank
  (no weight decay on biases and norm scales) subtract it."""
  names = [_key_name(k) for k in path]
  return int(any(n in BLOCK_KEYS and i + 1 < len(names) and not names[i + 1].isdigit()
                 for i, n in enumerate(names)))


def _is_block_dict(d) -> bool:
  return isinstance(d, dict) and bool(d) and all(str(k).isdigit() for k in d)


def unstack_blocks(tree):
  """A parameter tree (nested dicts, e.g. `nnx.to_pure_dict`) with every scanned block stack under
  `BLOCK_KEYS` turned into the per-block layout {0: ..., 1: ...}; per-block trees pass unchanged."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k in BLOCK_KEYS and isinstance(v, dict) and v and not _is_block_dict(v):
      depth = jax.tree.leaves(v)[0].shape[0]
      out[k] = {i: jax.tree.map(lambda a, i=i: a[i], v) for i in range(depth)}
    else:
      out[k] = unstack_blocks(v)
  return out


def stack_blocks(tree):
  """The inverse of `unstack_blocks`: per-block {0: ..., 1: ...} under `BLOCK_KEYS` stacked on a
  leading axis (blocks in index order)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k in BLOCK_KEYS and _is_block_dict(v):
      items = [v[i] for i in sorted(v, key=int)]
      out[k] = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *items)
    else:
      out[k] = stack_blocks(v)
  return out


def match_layout(tree, module):
  """`tree` (a pure dict) in the block layout of `module`'s parameters (per-block or scanned)."""
  flat = unstack_blocks(tree)
  return stack_blocks(flat) if _any_scanned(nnx.to_pure_dict(nnx.state(module))) else flat


def _any_scanned(tree) -> bool:
  if not isinstance(tree, dict):
    return False
  return any((k in BLOCK_KEYS and isinstance(v, dict) and v and not _is_block_dict(v)) or _any_scanned(v)
             for k, v in tree.items())


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
    self.drop_path_rates = tuple(float(r) for r in rates)
    self.blocks = make_blocks(
        lambda i, r: Block(spec.width, spec.num_heads, spec.mlp_ratio, drop_path_rate=r,
                           attention=spec.attention, dtype=dtype, rngs=rngs),
        rates, spec.scan_layers)
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

  def run(self, x, *, key=None, intermediates: bool = False, **unused):
    """The blocks alone (no final norm): (last output, every block's output if `intermediates`)."""
    return run_blocks(self.blocks, x, key, rates=self.drop_path_rates, remat=self.spec.remat,
                      intermediates=intermediates)

  def transform(self, x, *, key=None, return_intermediates: bool = False):
    """Runs the blocks and the final norm. Intermediates are the block outputs (before norm)."""
    x, feats = self.run(x, key=key, intermediates=return_intermediates)
    x = self.norm(x)
    return (x, feats) if return_intermediates else x

  def __call__(self, images, *, key=None, return_intermediates: bool = False):
    """Plain ViT forward on all patches: [CLS, patches] -> normed tokens."""
    x = self.embed(images)
    x = jnp.concatenate([self.cls(x.shape[0]), x], axis=1)
    return self.transform(x, key=key, return_intermediates=return_intermediates)


def downstream_spec(spec: ViTSpec, depth: int, image_size: int | None, run: dict | None = None) -> ViTSpec:
  """`spec` with `depth` blocks at `image_size` (default: the pretraining size), for a downstream copy;
  `run`: other values of the fields that say how the blocks run (attention, remat, scan_layers), e.g.
  a fine-tuning config's (the weights load into either block layout)."""
  image_size = int(image_size or spec.image_size)
  if image_size % spec.patch_size:
    raise ValueError(f"model.image_size={image_size} is not a multiple of the patch size {spec.patch_size}")
  unknown = set(run or {}) - {"attention", "remat", "scan_layers"}
  if unknown:
    raise ValueError(f"run={run!r}: only attention, remat and scan_layers can differ downstream")
  return dataclasses.replace(spec, depth=int(depth), image_size=image_size, **(run or {}))


def load_weights(dst, pure: dict, *, drop_path: float, full_depth: int):
  """Writes `pure` (an `nnx.to_pure_dict` of a pretrained encoder, already cut and resized to dst's
  shapes, in either block layout) into `dst`, and gives dst's blocks the stochastic-depth rates of
  timm's linear ramp over the full pretrained depth (a truncated copy keeps the rates of its first
  blocks)."""
  state = nnx.state(dst)
  nnx.replace_by_pure_dict(state, match_layout(pure, dst))
  nnx.update(dst, state)
  rates = np.linspace(0, drop_path, full_depth) if full_depth else []
  depth = num_blocks(dst.blocks)
  dst.drop_path_rates = tuple(float(r) for r in rates[:depth])
  if not is_scanned(dst.blocks):
    for blk, r in zip(dst.blocks, dst.drop_path_rates):
      blk.drop_path_rate = r
  return dst
