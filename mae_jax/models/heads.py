"""Downstream heads on a pretrained ViT encoder (docs/methods.md#downstream).

`Classifier` is MAE's fine-tuning model (facebookresearch/mae `models_vit.py` with
`global_pool=True`): the blocks run without the encoder's final norm, the patch tokens are averaged
(CLS and the D²MAE blurriness token excluded), a new `fc_norm` LayerNorm (eps 1e-6) normalises the
pooled feature, and a Linear `head` with weights ~ normal(2e-5) and a zero bias maps it to logits.
MAE initialises the head with timm's `trunc_normal_(std=2e-5)`, whose cut-off is at ±2 in absolute
value — for std 2e-5 that is an untruncated normal, which is what we draw. `global_pool='token'`
uses the CLS token after the final norm instead (no `fc_norm`).

`LinearProbe` is MAE's `main_linprobe.py` model: frozen encoder, the CLS token after the final norm
(or, with `global_pool='avg'`, its `--global_pool` variant: the mean patch token through a frozen fc_norm),
BatchNorm without affine parameters (eps 1e-6, torch momentum 0.1 = running-average momentum 0.9)
and a Linear head (trunc_normal std 0.01 in MAE; normal(0.01) here, same reasoning as above).

D²MAE encoders keep the blurriness token: the sequence is [CLS, BLU(t*), patches] (`'token'`) or
BLU(t*) is added to every patch token (`'add'`), with t* the per-image level of the optimal
blurriness search and the learnable vector of BLU copied from pretraining (and trained further when
fine-tuning). Pass `blur_t` (N,) int to the call.

The attribute names `encoder`, `fc_norm`, `head` are what `mae_jax.export` reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models import mae as mae_lib
from mae_jax.models import vit

GLOBAL_POOLS = ("avg", "token")


def copy_encoder(src: vit.Encoder, *, drop_path: float = 0.0, learnable_pos: bool = True,
                 seed: int = 0, run: dict | None = None) -> vit.Encoder:
  """A fresh encoder with `src`'s weights, stochastic depth `drop_path` (linear over depth, as
  timm) and a trainable position table (timm/MAE fine-tuning train `pos_embed`). A BEiT encoder
  (USFM's) copies itself with one relative position table per block (`beit.Encoder.finetune_copy`).
  run: `vit.downstream_spec`'s (another block layout, remat or attention than pretraining's)."""
  if hasattr(src, "finetune_copy"):
    return src.finetune_copy(drop_path=drop_path, seed=seed, run=run)
  spec = vit.downstream_spec(src.spec, src.spec.depth, None, run)
  dst = vit.Encoder(spec, drop_path_rate=drop_path, learnable_pos=learnable_pos, dtype=src.dtype,
                    rngs=nnx.Rngs(seed))
  state = nnx.state(dst)
  nnx.replace_by_pure_dict(state, vit.match_layout(nnx.to_pure_dict(nnx.state(src)), dst))
  nnx.update(dst, state)
  return dst


class BlurTokenSequence(nnx.Module):
  """[CLS, (BLU(t)), patch tokens] as in `mae.MAE.forward_encoder` with mask ratio 0, and the
  pooling the classification heads share."""

  def _init_head_model(self, encoder, num_classes: int, *, global_pool: str, drop_path: float,
                       learnable_pos: bool, blur_embed: str, blur_token, seed: int, fc_norm_dtype,
                       rngs: nnx.Rngs, run: dict | None = None):
    if global_pool not in GLOBAL_POOLS:
      raise ValueError(f"global_pool={global_pool!r}: expected one of {GLOBAL_POOLS}")
    if num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    self.global_pool = global_pool
    self.num_classes = num_classes
    self.encoder = copy_encoder(encoder, drop_path=drop_path, learnable_pos=learnable_pos, seed=seed, run=run)
    self._init_blur(self.encoder, blur_embed, blur_token)
    self.fc_norm = (nnx.LayerNorm(encoder.spec.width, epsilon=vit.LN_EPS, dtype=fc_norm_dtype,
                                  param_dtype=jnp.float32, rngs=rngs)
                    if global_pool == "avg" else None)

  def pooled(self, images, *, blur_t=None, key=None):
    """CLS after the final norm ('token'), or fc_norm of the mean patch token without it ('avg')."""
    x = self.tokens(images, blur_t)
    if self.global_pool == "token":
      return self.encoder.transform(x, key=key)[:, 0]
    x, _ = self.encoder.run(x, key=key)
    return self.fc_norm(x[:, self.num_prefix:].mean(axis=1))

  def _init_blur(self, encoder, blur_embed: str, blur_token):
    if blur_embed not in mae_lib.BLUR_EMBEDS:
      raise ValueError(f"blur_embed={blur_embed!r}: expected one of {mae_lib.BLUR_EMBEDS}")
    self.blur_embed = blur_embed
    if blur_embed != "none":
      if blur_token is None:
        raise ValueError(f"blur_embed={blur_embed!r} needs the pretrained blur_token vector")
      self.blur_token = nnx.Param(jnp.asarray(blur_token, jnp.float32).reshape(1, encoder.spec.width))

  @property
  def num_prefix(self) -> int:
    return 2 if self.blur_embed == "token" else 1

  def tokens(self, images, blur_t=None):
    enc = self.encoder
    x = enc.embed(images)
    n = x.shape[0]
    prefix = [enc.cls(n)]
    if self.blur_embed != "none":
      if blur_t is None:
        raise ValueError("this encoder carries the D²MAE blurriness embedding: pass blur_t (N,)")
      emb = mae_lib.timestep_embedding(jnp.broadcast_to(jnp.asarray(blur_t), (n,)), enc.spec.width)
      emb = (emb + self.blur_token[...]).astype(enc.dtype)
      if self.blur_embed == "add":
        x = x + emb[:, None, :]
      else:  # zero position row, like CLS
        prefix.append(emb[:, None, :])
    return jnp.concatenate(prefix + [x], axis=1)


class Classifier(BlurTokenSequence):
  """Fine-tuning model: encoder (+ drop path) -> global pool -> fc_norm -> head."""

  def __init__(self, encoder: vit.Encoder, num_classes: int, *, global_pool: str = "avg",
               drop_path: float = 0.0, blur_embed: str = "none", blur_token=None, seed: int = 0,
               run: dict | None = None):
    rngs = nnx.Rngs(seed)  # one stream, drawn in the same order as always: fc_norm, then head
    self._init_head_model(encoder, num_classes, global_pool=global_pool, drop_path=drop_path,
                          learnable_pos=True, blur_embed=blur_embed, blur_token=blur_token, seed=seed,
                          fc_norm_dtype=encoder.dtype, rngs=rngs, run=run)
    self.head = nnx.Linear(encoder.spec.width, num_classes, kernel_init=nnx.initializers.normal(2e-5),
                           bias_init=nnx.initializers.zeros_init(), dtype=encoder.dtype,
                           param_dtype=jnp.float32, rngs=rngs)

  def features(self, images, *, blur_t=None, key=None):
    return self.pooled(images, blur_t=blur_t, key=key)

  def __call__(self, images, *, blur_t=None, key=None):
    """images: normalised NHWC. key: drop-path key (None = inference). Returns float32 logits."""
    return self.head(self.features(images, blur_t=blur_t, key=key)).astype(jnp.float32)


class LinearProbe(BlurTokenSequence):
  """Linear probing (MAE main_linprobe.py): frozen encoder -> pooled feature -> BatchNorm (no
  affine) + Linear. Only `head` is trained; `bn` carries running statistics (nnx.BatchStat).

  global_pool='token' (main_linprobe's default, `--cls_token`): CLS after the final norm.
  global_pool='avg' (`--global_pool`): mean of the patch tokens without the final norm, then
  `fc_norm`, a LayerNorm that stays at its init (scale 1, bias 0) because the script freezes
  everything but the head — it only standardises the pooled feature."""

  def __init__(self, encoder: vit.Encoder, num_classes: int, *, global_pool: str = "token",
               blur_embed: str = "none", blur_token=None, seed: int = 0, run: dict | None = None):
    rngs = nnx.Rngs(seed)
    self._init_head_model(encoder, num_classes, global_pool=global_pool, drop_path=0.0,
                          learnable_pos=False, blur_embed=blur_embed, blur_token=blur_token, seed=seed,
                          fc_norm_dtype=jnp.float32, rngs=rngs, run=run)
    width = encoder.spec.width
    self.bn = nnx.BatchNorm(width, use_bias=False, use_scale=False, epsilon=1e-6, momentum=0.9,
                            dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.normal(0.01),
                           bias_init=nnx.initializers.zeros_init(), param_dtype=jnp.float32, rngs=rngs)

  def features(self, images, *, blur_t=None):
    return jax.lax.stop_gradient(self.pooled(images, blur_t=blur_t).astype(jnp.float32))

  def __call__(self, images, *, blur_t=None, train: bool = False, key=None):
    del key  # no stochastic layers
    x = self.bn(self.features(images, blur_t=blur_t), use_running_average=not train)
    return self.head(x).astype(jnp.float32)


def from_pretrained(model, num_classes: int, *, kind: str = "finetune", global_pool: str | None = None,
                    drop_path: float = 0.0, seed: int = 0, run: dict | None = None):
  """A `Classifier` ('finetune') or `LinearProbe` ('linear_probe') on a pretrained MAE / SimMIM
  model's encoder, keeping its D²MAE blurriness token if it has one. global_pool None: MAE's
  defaults, 'avg' for fine-tuning and 'token' for linear probing. run: see `copy_encoder`."""
  blur_embed = getattr(model, "blur_embed", "none")
  blur_token = model.blur_token[...] if blur_embed != "none" else None
  if kind == "finetune":
    return Classifier(model.encoder, num_classes, global_pool=global_pool or "avg", drop_path=drop_path,
                      blur_embed=blur_embed, blur_token=blur_token, seed=seed, run=run)
  if kind == "linear_probe":
    return LinearProbe(model.encoder, num_classes, global_pool=global_pool or "token", blur_embed=blur_embed,
                       blur_token=blur_token, seed=seed, run=run)
  raise ValueError(f"kind={kind!r}: expected 'finetune' or 'linear_probe'")
