"""Layer-wise learning-rate decay and the fine-tuning weight-decay mask (docs/methods.md#downstream), as MAE's
`util/lr_decay.py` (`param_groups_lrd` + `get_layer_id_for_vit`) defines them.

With a ViT of `depth` blocks MAE sets `num_layers = depth + 1` and gives each parameter a layer id:

  * `cls_token`, `pos_embed`, `patch_embed.*`                      -> 0
  * `blocks.i.*`                                                  -> i + 1
  * everything else (the encoder's `norm`, `fc_norm`, `head`, ...) -> num_layers (= depth + 1)

and scales its learning rate by `decay ** (num_layers - layer_id)`: the head trains at the full
rate, the last block at `decay`, the embeddings at `decay ** (depth + 1)`. (Counting as timm does,
with L = depth, the same numbers read ids 0 / i+1 / L+1 and multiplier decay^(L+1-id).)

The D²MAE blurriness vector `blur_token` is an input token like CLS: layer 0 and no weight decay
(MAE has no such parameter; this is our choice, documented in docs/downstream.md).

The multiplier scales the whole AdamW step of a parameter — Adam direction and decoupled weight
decay alike — exactly as torch's AdamW does with a per-group `lr = lr_scale * lr`.

Weight decay (`train.no_decay`): mae (default) none on 1-D parameters (biases, norm scales),
`pos_embed`, `cls_token` (MAE's `no_weight_decay_list`), `blur_token` and BEiT's relative-position
tables; usfm as USFM's optimizer groups; none on every parameter (`weight_decay_mask`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

EMBEDDINGS = ("cls_token", "pos_embed", "patch_embed", "blur_token")
NO_DECAY = ("cls_token", "pos_embed", "blur_token")


def _names(path) -> list[str]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return out


def _strip_encoder(names: list[str]) -> list[str]:
  # The classifier nests the ViT under `encoder`; MAE's names are the ViT's own (`blocks.3...`).
  return names[1:] if names and names[0] == "encoder" else names


def layer_id(names, depth: int) -> int:
  """MAE's `get_layer_id_for_vit` on a parameter path ('encoder', 'blocks', '3', ...)."""
  names = _strip_encoder([str(n) for n in names])
  num_layers = depth + 1
  if not names:
    return num_layers
  if names[0] in EMBEDDINGS:
    return 0
  if names[0] == "blocks":
    return int(names[1]) + 1 if names[1:2] and names[1].isdigit() else -1  # -1: a scanned stack
  return num_layers


def layer_ids(params, depth: int):
  return jax.tree_util.tree_map_with_path(lambda p, _: layer_id(_names(p), depth), params)


def lr_multipliers(params, depth: int, decay: float):
  """Pytree like `params` of Python floats decay ** (num_layers - layer_id), num_layers = depth + 1."""
  import numpy as np
  num_layers = depth + 1

  def mult(p, x):
    i = layer_id(_names(p), depth)
    if i >= 0:
      return float(decay) ** (num_layers - i)
    # Scanned blocks (model.scan_layers): block k of the stack is layer k + 1, one factor per slice.
    ids = np.arange(1, x.shape[0] + 1)
    return (float(decay) ** (num_layers - ids)).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1))

  return jax.tree_util.tree_map_with_path(mult, params)


NO_DECAY_MODES = ("mae", "usfm", "none")


def weight_decay_mask(params, mode: str = "mae"):
  """True where AdamW decays the weight. mae: not 1-D, not pos_embed / cls_token / blur_token / BEiT's
  relative-position tables; usfm: not 1-D, not a bias, not pos_embed / cls_token (USFM's
  `no_weight_decay`, usdsgen/utils/optimizer.py: its relative-position tables are decayed); none:
  every parameter (a plain torch AdamW over `model.parameters()`)."""
  if mode not in NO_DECAY_MODES:
    raise ValueError(f"train.no_decay={mode!r}: expected one of {NO_DECAY_MODES}")
  from mae_jax.models import vit
  if mode == "none":
    return jax.tree.map(lambda _: True, params)

  def decays_usfm(path, x) -> bool:
    names = _strip_encoder(_names(path))
    return (getattr(x, "ndim", 0) - vit.stacked_axes(path) > 1 and not (names and names[-1] == "bias")
            and not (names and names[0] in ("pos_embed", "cls_token")))

  if mode == "usfm":
    return jax.tree_util.tree_map_with_path(decays_usfm, params)

  def decays(path, x) -> bool:
    names = _strip_encoder(_names(path))
    # BEiT's relative position tables are position parameters like pos_embed (timm's Beit excludes them).
    return (getattr(x, "ndim", 0) - vit.stacked_axes(path) > 1 and not (names and names[0] in NO_DECAY)
            and not (names and names[-1] == "relative_position_bias_table"))

  return jax.tree_util.tree_map_with_path(decays, params)


class _ScaleState(NamedTuple):
  pass


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf factor (a pytree like the params)."""

  def init_fn(params):
    del params
    return _ScaleState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init_fn, update_fn)


def layerwise_adamw(schedule, params, *, depth: int, layer_decay: float, b1: float = 0.9,
                    b2: float = 0.999, weight_decay: float = 0.05, grad_clip: float = 0.0,
                    eps: float = 1e-8, no_decay: str = "mae") -> optax.GradientTransformation:
  """AdamW with MAE's layer-wise lr decay and a fine-tuning weight-decay mask (`weight_decay_mask`)."""
  mults = lr_multipliers(params, depth, layer_decay)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts += [
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(params, no_decay)),
      scale_by_tree(mults),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*parts)


def lars(schedule, params, *, momentum: float = 0.9, trust_coefficient: float = 0.001,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  """MAE's linear-probe LARS: trust ratio and weight decay only on parameters with ndim > 1
  (MAE's `util/lars.py` skips biases and norm parameters)."""
  matrix: Any = jax.tree.map(lambda x: getattr(x, "ndim", 0) > 1, params)
  return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=matrix,
                    trust_coefficient=trust_coefficient, trust_ratio_mask=matrix, momentum=momentum)


def layer_decay_for(config, pretrain_config) -> float:
  """`config.train.layer_decay`, or the default for the pretrained size (docs/methods.md#fine-tuning): 0.65 for ViT-B,
  0.75 otherwise (MAE uses 0.75 for L/H)."""
  if config.train.layer_decay is not None:
    return float(config.train.layer_decay)
  return 0.65 if pretrain_config.model.variant == "b" else 0.75
