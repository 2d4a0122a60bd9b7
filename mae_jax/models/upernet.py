"""UperNet on a pretrained ViT encoder (USFM §4.1.2, as BEiT / mmseg build it; docs/methods.md#downstream).

`Segmenter` = the pretrained encoder + four resampling necks + `UperHead`:

1. **Features.** The outputs of encoder blocks `blocks` (1-based; USFM: 3, 5, 7, 11 of ViT-B's 12),
   patch tokens only (CLS and the D²MAE blurriness token dropped), before any norm, reshaped to
   (N, h, w, D) on the patch grid. Encoders of another depth take the same relative positions,
   `round(b · depth / 12)` (at least 1) for b in (3, 5, 7, 11), repeats allowed: the 2-block smoke
   model `micro` uses blocks (1, 1, 1, 2), a 24-block ViT-L (6, 10, 14, 22). Blocks after the last
   one used (and the encoder's final norm) are dropped from the model: they cannot reach the output.
   Note: BEiT's mmseg configs and USFM's code (configs/model/Seg/Upernet.yaml) write
   `out_indices=[3, 5, 7, 11]` 0-based (blocks 4, 6, 8, 12); the default follows USFM's text ("3rd,
   5th, 7th and 11th", 1-based), `configs/segment.py:paper=usfm` follows its code (`blocks=4,6,8,12`,
   plus the auxiliary `FCNHead` on the stride-16 level). `blocks=` overrides.
2. **Necks** (BEiT's fpn1..fpn4) resample feature k to 1/4, 1/8, 1/16, 1/32 of the input side. For a
   patch p the factor is f = p / s (s = 4, 8, 16, 32): f ≥ 2 → log2(f) stride-2 2×2 transposed convs
   (D → D) with GroupNorm + GELU between them (BEiT: BatchNorm + GELU); f = 1 → identity; f < 1 →
   max-pool with window and stride 1/f. For patch 16 that is exactly BEiT's 4×, 2×, identity, ½. For
   a patch that is not a power of two (ViT-H/14) the nearest power-of-two step is taken (deconvs up
   to at least the target, pooling down to at most it) and a bilinear resize lands on
   `image_size // s`.
3. **UperHead** (mmseg `UPerHead`, channels C = `channels`, 512 in mmseg): pyramid pooling module on
   the 1/32 map (adaptive average pools to 1, 2, 3, 6 bins, each 1×1 conv D → C + norm + ReLU,
   bilinear back, concatenated with the map, 3×3 conv → C); 1×1 lateral convs D → C on the other
   three levels; top-down path (each level += bilinear upsample of the coarser one); 3×3 conv on
   each of the three finer levels; all four upsampled to 1/4 and concatenated, 3×3 conv 4C → C;
   channel dropout (Dropout2d, `dropout`, 0.1 in mmseg); 1×1 conv C → num_classes.
4. The logits are resized bilinearly to the input size (as mmseg's segmentor does).

Bilinear resizes use half-pixel centres without antialiasing, i.e. torch's
`F.interpolate(mode='bilinear', align_corners=False)`; adaptive pooling uses torch's bins
[floor(i·H/o), ceil((i+1)·H/o)).

**Norm: GroupNorm, not BatchNorm.** mmseg's UperNet uses (Sync)BatchNorm in every ConvModule. We use
GroupNorm (`norm_groups` groups, 32 by default; gcd(groups, channels) when they do not divide), for
three reasons: segmentation batches are small (16 images in BEiT, 2 per GPU, which is why mmseg
needs *Sync*BN), and GroupNorm does not depend on the batch at all; it behaves identically in
training and evaluation, so the validation score that picks the best model is the score of the
model that is tested; and it has no running statistics, so the train step stays a pure function of
(params, batch) like the classification step and checkpoints hold params only. Convs followed by a
norm have no bias (mmseg's `bias='auto'`).

Initialisation: Flax defaults for convs (LeCun normal, zero bias), GroupNorm scale 1 / bias 0, and
the classifier conv normal(0.01) with zero bias (mmseg's `normal_init(conv_seg, std=0.01)`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.models import heads
from mae_jax.models import vit

USFM_BLOCKS = (3, 5, 7, 11)  # 1-based, of a 12-block ViT
SCALES = (4, 8, 16, 32)  # output strides of the four pyramid levels
POOL_SCALES = (1, 2, 3, 6)


def feature_blocks(depth: int, blocks=None) -> tuple[int, ...]:
  """The four 1-based encoder blocks whose outputs feed the pyramid (see module docstring)."""
  if blocks:
    out = tuple(int(b) for b in blocks)
    if len(out) != len(SCALES):
      raise ValueError(f"model.blocks={blocks!r}: expected {len(SCALES)} block numbers")
    bad = [b for b in out if not 1 <= b <= depth]
    if bad:
      raise ValueError(f"model.blocks={blocks!r}: blocks are 1-based and must lie in [1, {depth}]")
    return out
  if depth == 12:
    return USFM_BLOCKS
  return tuple(max(1, min(depth, int(math.floor(b * depth / 12 + 0.5)))) for b in USFM_BLOCKS)


@dataclasses.dataclass(frozen=True)
class LevelPlan:
  """How one pyramid level is made from the patch grid."""
  scale: int  # output stride s
  up: int  # number of stride-2 transposed convs
  pool: int  # max-pool window = stride (1 = none)
  size: int  # side of the output map (image_size // s)
  resize: bool  # a final bilinear resize is needed (patch not a power of two)


def level_plans(image_size: int, patch_size: int) -> tuple[LevelPlan, ...]:
  grid = image_size // patch_size
  plans = []
  for s in SCALES:
    size = image_size // s
    if size < 1:
      raise ValueError(f"image_size={image_size} is smaller than the coarsest pyramid stride {s}")
    f = patch_size / s
    up = max(0, math.ceil(math.log2(f) - 1e-9)) if f > 1 else 0
    pool = 2 ** max(0, math.floor(math.log2(1 / f) + 1e-9)) if f < 1 else 1
    pool = min(pool, grid)
    side = grid * 2**up // pool
    plans.append(LevelPlan(s, up, pool, size, side != size))
  return tuple(plans)


def pyramid_shapes(image_size: int, patch_size: int, width: int) -> list[tuple[int, int, int]]:
  """(side, side, width) of the four neck outputs, for one image."""
  return [(p.size, p.size, width) for p in level_plans(image_size, patch_size)]


def resize_bilinear(x, size: tuple[int, int]):
  """NHWC bilinear resize, half-pixel centres, no antialiasing (torch align_corners=False)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], size[0], size[1], x.shape[3]), "bilinear",
                          antialias=False)


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging matrix of torch's adaptive_avg_pool along one axis."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x, bins: int):
  """NHWC adaptive average pooling to (bins, bins) with torch's bin edges (any input size)."""
  rows = jnp.asarray(_adaptive_matrix(x.shape[1], bins), x.dtype)
  cols = jnp.asarray(_adaptive_matrix(x.shape[2], bins), x.dtype)
  return jnp.einsum("oh,nhwc,pw->nopc", rows, x, cols)


def max_pool(x, window: int):
  if window == 1:
    return x
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, window, window, 1), "VALID")


def _groups(channels: int, groups: int) -> int:
  return math.gcd(channels, max(1, int(groups)))


class ConvNormAct(nnx.Module):
  """mmseg `ConvModule`: conv (no bias) -> GroupNorm -> ReLU."""

  def __init__(self, cin, cout, kernel, *, groups, dtype, rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), padding="SAME", use_bias=False, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)
    self.norm = nnx.GroupNorm(cout, num_groups=_groups(cout, groups), epsilon=1e-5, dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.norm(self.conv(x)))


class Neck(nnx.Module):
  """One of BEiT's fpn1..fpn4: patch grid -> one pyramid level (see `level_plans`)."""

  def __init__(self, width: int, plan: LevelPlan, *, groups, dtype, rngs):
    self.plan = plan
    self.deconvs = nnx.List([
        nnx.ConvTranspose(width, width, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                          param_dtype=jnp.float32, rngs=rngs) for _ in range(plan.up)])
    self.norms = nnx.List([
        nnx.GroupNorm(width, num_groups=_groups(width, groups), epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs) for _ in range(max(plan.up - 1, 0))])

  def __call__(self, x):
    for i, deconv in enumerate(self.deconvs):
      if i:
        x = jax.nn.gelu(self.norms[i - 1](x), approximate=False)
      x = deconv(x)
    x = max_pool(x, self.plan.pool)
    if self.plan.resize:
      x = resize_bilinear(x, (self.plan.size, self.plan.size))
    return x


class UperHead(nnx.Module):
  """mmseg `UPerHead` (PPM + FPN) on four maps of `in_dim` channels, finest first."""

  def __init__(self, in_dim: int, channels: int, num_classes: int, *, pool_scales=POOL_SCALES,
               groups: int = 32, dropout: float = 0.1, dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(groups=groups, dtype=dtype, rngs=rngs)
    self.pool_scales = tuple(int(s) for s in pool_scales)
    self.dropout = float(dropout)
    self.ppm = nnx.List([ConvNormAct(in_dim, channels, 1, **kw) for _ in self.pool_scales])
    self.bottleneck = ConvNormAct(in_dim + len(self.pool_scales) * channels, channels, 3, **kw)
    self.lateral = nnx.List([ConvNormAct(in_dim, channels, 1, **kw) for _ in range(len(SCALES) - 1)])
    self.fpn = nnx.List([ConvNormAct(channels, channels, 3, **kw) for _ in range(len(SCALES) - 1)])
    self.fpn_bottleneck = ConvNormAct(len(SCALES) * channels, channels, 3, **kw)
    self.cls = nnx.Conv(channels, num_classes, (1, 1), kernel_init=nnx.initializers.normal(0.01),
                        bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32,
                        rngs=rngs)

  def psp(self, x):
    size = x.shape[1:3]
    outs = [x] + [resize_bilinear(conv(adaptive_avg_pool(x, s)), size)
                  for s, conv in zip(self.pool_scales, self.ppm)]
    return self.bottleneck(jnp.concatenate(outs, axis=-1))

  def __call__(self, feats, *, key=None):
    """feats: four NHWC maps at strides 4, 8, 16, 32. key: dropout key (None = inference).
    Returns logits at the resolution of feats[0]."""
    lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [self.psp(feats[-1])]
    for i in range(len(lat) - 1, 0, -1):
      lat[i - 1] = lat[i - 1] + resize_bilinear(lat[i], lat[i - 1].shape[1:3])
    outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
    size = outs[0].shape[1:3]
    x = self.fpn_bottleneck(jnp.concatenate([resize_bilinear(o, size) for o in outs], axis=-1))
    if key is not None and self.dropout > 0:
      keep = 1.0 - self.dropout  # Dropout2d: whole channels per image
      m = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, x.shape[-1]))
      x = jnp.where(m, x / keep, 0).astype(x.dtype)
    return self.cls(x)


class FCNHead(nnx.Module):
  """mmseg `FCNHead` as USFM's auxiliary head (configs/model/Seg/Upernet.yaml: in_index 2, channels
  256, num_convs 1, concat_input false, dropout 0.1): 3×3 conv + norm + ReLU, channel dropout, 1×1
  conv to the classes. Trained with its own cross-entropy (weight 0.4), unused at inference."""

  def __init__(self, in_dim: int, channels: int, num_classes: int, *, groups: int = 32,
               dropout: float = 0.1, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = ConvNormAct(in_dim, channels, 3, groups=groups, dtype=dtype, rngs=rngs)
    self.dropout = float(dropout)
    self.cls = nnx.Conv(channels, num_classes, (1, 1), kernel_init=nnx.initializers.normal(0.01),
                        bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32,
                        rngs=rngs)

  def __call__(self, x, *, key=None):
    x = self.conv(x)
    if key is not None and self.dropout > 0:
      keep = 1.0 - self.dropout
      m = jax.random.bernoulli(key, keep, (x.shape[0], 1, 1, x.shape[-1]))
      x = jnp.where(m, x / keep, 0).astype(x.dtype)
    return self.cls(x)


AUX_LEVEL = 2  # USFM / mmseg in_index: the third pyramid level (stride 16)


def resize_pos_embed(table, grid_in: tuple[int, int], grid_out: tuple[int, int], num_prefix: int = 1):
  """(1, prefix + h·w, D) position table resampled to another patch grid: the prefix rows (CLS) are
  kept, the patch rows are resized bicubically on the grid (as mmseg's `resize_pos_embed` for an
  input larger than the pretraining one; jax's bicubic is Keys a = −0.5, torch's a = −0.75)."""
  table = jnp.asarray(table)
  if tuple(grid_in) == tuple(grid_out):
    return table
  d = table.shape[-1]
  grid = table[:, num_prefix:].reshape(1, grid_in[0], grid_in[1], d)
  grid = jax.image.resize(grid, (1, grid_out[0], grid_out[1], d), "bicubic", antialias=False)
  return jnp.concatenate([table[:, :num_prefix], grid.reshape(1, -1, d).astype(table.dtype)], axis=1)


def truncated_encoder(src: vit.Encoder, depth: int, *, drop_path: float, seed: int,
                      image_size: int | None = None, run: dict | None = None) -> vit.Encoder:
  """`src`'s embeddings and first `depth` blocks (weights copied, position table trainable and
  resized to `image_size` when that differs from the pretraining size), no final norm. Stochastic
  depth keeps the rates of the full-depth linear ramp (timm's). A BEiT encoder resizes its relative
  position tables instead (`beit.Encoder.finetune_copy`)."""
  if hasattr(src, "finetune_copy"):
    return src.finetune_copy(drop_path=drop_path, seed=seed, depth=depth, image_size=image_size,
                             keep_norm=False, run=run)
  spec = vit.downstream_spec(src.spec, depth, image_size, run)
  dst = vit.Encoder(spec, learnable_pos=True, dtype=src.dtype, rngs=nnx.Rngs(seed))
  full = vit.unstack_blocks(nnx.to_pure_dict(nnx.state(src)))
  full["pos_embed"] = resize_pos_embed(full["pos_embed"], src.spec.grid, spec.grid)
  full["blocks"] = {k: v for k, v in full["blocks"].items() if int(k) < depth}
  full.pop("norm", None)
  dst.norm = None
  return vit.load_weights(dst, full, drop_path=drop_path, full_depth=src.spec.depth)


class Segmenter(heads.BlurTokenSequence):  # the [CLS, (BLU(t)), patches] sequence of fine-tuning
  """Pretrained ViT + BEiT necks + UperHead. `__call__(images) -> (N, H, W, num_classes)` logits."""

  def __init__(self, encoder: vit.Encoder, num_classes: int, *, channels: int = 512, blocks=None,
               pool_scales=POOL_SCALES, norm_groups: int = 32, drop_path: float = 0.0,
               dropout: float = 0.1, blur_embed: str = "none", blur_token=None, image_size=None,
               aux_channels: int = 0, seed: int = 0, run: dict | None = None):
    if num_classes < 2:
      raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    spec = encoder.spec
    self.num_classes = num_classes
    self.full_depth = spec.depth
    self.blocks = feature_blocks(spec.depth, blocks)
    self.encoder = truncated_encoder(encoder, max(self.blocks), drop_path=drop_path, seed=seed,
                                     image_size=image_size, run=run)
    self._init_blur(self.encoder, blur_embed, blur_token)
    rngs = nnx.Rngs(seed + 1)
    dtype = encoder.dtype
    spec = self.encoder.spec
    self.plans = level_plans(spec.image_size, spec.patch_size)
    self.necks = nnx.List([Neck(spec.width, p, groups=norm_groups, dtype=dtype, rngs=rngs)
                           for p in self.plans])
    self.head = UperHead(spec.width, channels, num_classes, pool_scales=pool_scales,
                         groups=norm_groups, dropout=dropout, dtype=dtype, rngs=rngs)
    # USFM's auxiliary FCN head on the third pyramid level (0 = none).
    self.aux = (FCNHead(spec.width, int(aux_channels), num_classes, groups=norm_groups, dropout=dropout,
                        dtype=dtype, rngs=nnx.Rngs(seed + 2)) if aux_channels else None)

  def features(self, images, *, blur_t=None, key=None):
    """The four block outputs as (N, h, w, D) patch-grid maps, in `self.blocks` order."""
    x = self.tokens(images, blur_t)
    _, feats = self.encoder.run(x, key=key, intermediates=True)
    h, w = self.encoder.spec.grid
    out = []
    for b in self.blocks:
      t = feats[b - 1][:, self.num_prefix:]
      out.append(t.reshape(t.shape[0], h, w, t.shape[-1]))
    return out

  def pyramid(self, images, *, blur_t=None, key=None):
    return [neck(f) for neck, f in zip(self.necks, self.features(images, blur_t=blur_t, key=key))]

  def __call__(self, images, *, blur_t=None, key=None, with_aux: bool = False):
    """images: normalised NHWC. key: drop-path / dropout key (None = inference). float32 logits;
    with_aux: (logits, auxiliary head logits), both at the input size."""
    k_enc, k_head = jax.random.split(key) if key is not None else (None, None)
    pyramid = self.pyramid(images, blur_t=blur_t, key=k_enc)
    logits = self.head(pyramid, key=k_head)
    logits = resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])
    if not with_aux:
      return logits
    if self.aux is None:
      raise ValueError("this segmenter has no auxiliary head (model.aux_channels=0)")
    k_aux = jax.random.fold_in(key, 1) if key is not None else None
    aux = self.aux(pyramid[AUX_LEVEL], key=k_aux)
    return logits, resize_bilinear(aux.astype(jnp.float32), images.shape[1:3])


def from_pretrained(model, num_classes: int, *, channels: int = 512, blocks=None,
                    pool_scales=POOL_SCALES, norm_groups: int = 32, drop_path: float = 0.0,
                    dropout: float = 0.1, image_size: int | None = None, aux_channels: int = 0,
                    seed: int = 0, run: dict | None = None) -> Segmenter:
  """A `Segmenter` on a pretrained MAE / SimMIM model's encoder, keeping its D²MAE blurriness token.
  run: another block layout, remat or attention than pretraining's (`vit.downstream_spec`)."""
  blur_embed = getattr(model, "blur_embed", "none")
  blur_token = model.blur_token[...] if blur_embed != "none" else None
  return Segmenter(model.encoder, num_classes, channels=channels, blocks=blocks,
                   pool_scales=pool_scales, norm_groups=norm_groups, drop_path=drop_path,
                   dropout=dropout, blur_embed=blur_embed, blur_token=blur_token,
                   image_size=image_size, aux_channels=aux_channels, seed=seed, run=run)
