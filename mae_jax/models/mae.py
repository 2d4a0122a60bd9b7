"""Masked image models: the MAE path (visible tokens + transformer decoder) and the SimMIM path
(all tokens + linear decoder, used by USFM). D²MAE's blurriness token lives here too.

Both return `(loss, pred, mask)` like facebookresearch/mae's `MaskedAutoencoderViT.forward`:
pred is (N, L, p*p*C) in patch order, mask is (N, L) with 1 = masked.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax import losses
from mae_jax import patches as patch_lib
from mae_jax.corrupt import masking
from mae_jax.models import vit

BLUR_EMBEDS = ("none", "token", "add")
LOSS_ON = ("masked", "all")


def timestep_embedding(t, dim: int):
  """DDPM's sinusoidal timestep embedding (Ho et al. 2020): [sin(t·ω), cos(t·ω)], ω_k = 10000^(-k/(half-1))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class MAE(nnx.Module):
  """MAE (He et al. 2022), with the optional D²MAE blurriness embedding."""

  def __init__(self, spec: vit.ViTSpec, *, decoder_width: int = 512, decoder_depth: int = 8,
               decoder_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
               loss_on: str = "masked", blur_embed: str = "none", dtype=jnp.float32,
               rngs: nnx.Rngs, encoder=None):
    if blur_embed not in BLUR_EMBEDS:
      raise ValueError(f"model.blur_embed={blur_embed!r}: expected one of {BLUR_EMBEDS}")
    if loss_on not in LOSS_ON:
      raise ValueError(f"model.loss_on={loss_on!r}: expected one of {LOSS_ON}")
    self.spec = spec
    self.mask_ratio = mask_ratio
    self.norm_pix_loss = norm_pix_loss
    self.loss_on = loss_on
    self.blur_embed = blur_embed
    self.dtype = dtype
    # `encoder`: another backbone with vit.Encoder's interface (models.beit.Encoder, USFM's).
    self.encoder = encoder if encoder is not None else vit.Encoder(spec, dtype=dtype, rngs=rngs)
    if blur_embed == "token" and getattr(self.encoder, "relative", False):
      raise ValueError("model.blur_embed='token' needs absolute positions (model.backbone='vit'): the "
                       "BEiT backbone's relative position bias has no row for a second prefix token")
    if blur_embed != "none":
      # BLU(t) = sinusoid(t) + one learnable D-vector: the paper's "768 parameters" for ViT-B.
      self.blur_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, spec.width)))
    self.decoder_embed = vit._dense(spec.width, decoder_width, dtype=dtype, rngs=rngs)
    self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, decoder_width)))
    self.decoder_pos_embed = vit.FixedPosEmbed(
        jnp.asarray(vit.sincos_2d(decoder_width, spec.grid, num_prefix=1))[None])
    self.decoder_blocks = vit.make_blocks(
        lambda i, r: vit.Block(decoder_width, decoder_heads, spec.mlp_ratio, attention=spec.attention,
                               dtype=dtype, rngs=rngs),
        [0.0] * decoder_depth, spec.scan_layers)
    self.decoder_norm = vit._norm(decoder_width, dtype=dtype, rngs=rngs)
    self.decoder_pred = vit._dense(decoder_width, spec.patch_dim, dtype=dtype, rngs=rngs)

  @property
  def num_prefix(self) -> int:
    return 2 if self.blur_embed == "token" else 1

  def blur_embedding(self, blur_t):
    emb = timestep_embedding(blur_t, self.spec.width) + self.blur_token[...]
    return emb.astype(self.dtype)

  def forward_encoder(self, images, noise, mask_ratio, blur_t=None):
    n = images.shape[0]
    if self.blur_embed != "none" and blur_t is None:
      raise ValueError("this model has a blurriness embedding: pass blur_t (the blur level index t)")
    # Masking before the (per-token) embedding: the same kept tokens as embedding all of them and
    # dropping the rest, as the official code does, for a (1 - mask_ratio) share of the work.
    ids_keep, mask, ids_restore = masking.keep_indices(noise, mask_ratio)
    x = self.encoder.embed_kept(images, ids_keep)
    mask = mask.astype(x.dtype)
    if self.blur_embed == "add":
      x = x + self.blur_embedding(blur_t)[:, None, :]
    prefix = [self.encoder.cls(n)]
    if self.blur_embed == "token":
      # The token gets a zero position row, like CLS.
      prefix.append(self.blur_embedding(blur_t)[:, None, :])
    x = jnp.concatenate(prefix + [x], axis=1)
    if getattr(self.encoder, "relative", False):  # relative bias of the kept tokens (BEiT)
      return self.encoder.transform(x, ids_keep=ids_keep), mask, ids_restore
    return self.encoder.transform(x), mask, ids_restore

  def forward_decoder(self, latent, ids_restore, rows=None):
    """Predicted patches (N, L, p·p·C) in patch order; with `rows` (N, R) of patch indices, the
    prediction at those patches only, (N, R, p·p·C), the last block after its attention, the norm
    and the head running on R tokens (every token still serves as key and value)."""
    p = self.num_prefix
    y = self.decoder_embed(latent)
    n, _, dd = y.shape
    num_mask = ids_restore.shape[1] + p - y.shape[1]
    mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(y.dtype), (n, num_mask, dd))
    y_ = jnp.concatenate([y[:, p:], mask_tokens], axis=1)
    y_ = patch_lib.take_tokens(y_, ids_restore)
    y = jnp.concatenate([y[:, :p], y_], axis=1)
    pos = self.decoder_pos_embed[...]
    if p == 2:
      pos = jnp.concatenate([pos[:, :1], jnp.zeros_like(pos[:, :1]), pos[:, 1:]], axis=1)
    y = y + pos.astype(y.dtype)
    depth = vit.num_blocks(self.decoder_blocks)
    if rows is None or not depth:
      y, _ = vit.run_blocks(self.decoder_blocks, y, None, remat=self.spec.remat, intermediates=False)
      y = y[:, p:] if rows is None else patch_lib.take_tokens(y, rows + p)
    else:
      y, _ = vit.run_blocks(vit.slice_blocks(self.decoder_blocks, 0, depth - 1), y, None,
                            remat=self.spec.remat, intermediates=False)
      # The last block changes the token count (T -> R), so it runs outside any scan.
      last = nnx.List(vit.block_list(vit.slice_blocks(self.decoder_blocks, depth - 1, depth)))
      y = vit.run_blocks(last, y, None, rows + p, remat=self.spec.remat, intermediates=False)[0]
    return self.decoder_pred(self.decoder_norm(y))

  def __call__(self, images, *, target=None, noise=None, key=None, mask_ratio=None, blur_t=None,
               return_pred: bool = True):
    """images: the (possibly corrupted) normalised input; target: the normalised clean image the
    loss compares to (defaults to `images`, i.e. plain MAE).

    return_pred=False (the training step): pred comes back as None, and with the loss on masked
    patches the decoder's last block, norm and head then run on the masked tokens only: the visible
    tokens' predictions enter the official loss with weight 0, so the loss and every gradient are
    the same, for ~1/4 of the last block's and the head's work less (docs/benchmarks.md).
    """
    mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
    if noise is None:
      if key is None:
        raise ValueError("pass either the masking noise or a PRNG key")
      noise = masking.random_mask_from_key(key, images.shape[0], self.spec.num_patches)
    latent, mask, ids_restore = self.forward_encoder(images, noise, mask_ratio, blur_t)
    target = images if target is None else target
    target_patches = patch_lib.patchify(target.astype(jnp.float32), self.spec.patch_size)
    if not return_pred and self.loss_on == "masked":
      removed = masking.removed_indices(noise, mask_ratio)
      pred = self.forward_decoder(latent, ids_restore, rows=removed).astype(jnp.float32)
      # The mean over the removed patches: sum(per-patch · mask) / sum(mask) of the official loss.
      loss = losses.patch_mse(pred, patch_lib.take_tokens(target_patches, removed), None,
                              norm_pix=self.norm_pix_loss)
      return loss, None, mask
    pred = self.forward_decoder(latent, ids_restore).astype(jnp.float32)
    loss = losses.patch_mse(pred, target_patches, mask if self.loss_on == "masked" else None,
                            norm_pix=self.norm_pix_loss)
    return loss, (pred if return_pred else None), mask


class SimMIM(nnx.Module):
  """SimMIM-style path used by USFM: the encoder sees every patch of the corrupted image and a single
  linear layer per token predicts its pixels; the loss is on the whole image (L1 + λ·FFL)."""

  def __init__(self, spec: vit.ViTSpec, *, ffl_weight: float = 0.4, ffl_alpha: float = 1.0,
               dtype=jnp.float32, rngs: nnx.Rngs, encoder=None):
    self.spec = spec
    self.ffl_weight = ffl_weight
    self.ffl_alpha = ffl_alpha
    self.encoder = encoder if encoder is not None else vit.Encoder(spec, dtype=dtype, rngs=rngs)
    self.decoder_pred = vit._dense(spec.width, spec.patch_dim, dtype=dtype, rngs=rngs)

  def __call__(self, images, *, target=None, pixel_mask=None, **unused):
    n = images.shape[0]
    x = self.encoder(images)
    pred = self.decoder_pred(x[:, 1:]).astype(jnp.float32)
    target = images if target is None else target
    pred_img = patch_lib.unpatchify(pred, self.spec.patch_size, self.spec.grid, self.spec.in_chans)
    loss = losses.usfm_loss(pred_img, target.astype(jnp.float32), lam=self.ffl_weight,
                            alpha=self.ffl_alpha)
    if pixel_mask is None:
      mask = jnp.zeros((n, self.spec.num_patches), jnp.float32)
    else:
      mask = patch_lib.patchify(pixel_mask.astype(jnp.float32), self.spec.patch_size).max(-1)
    return loss, pred, mask
