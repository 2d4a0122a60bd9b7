"""Layer-wise lr decay and the fine-tuning weight-decay mask (docs/methods.md#downstream), against MAE's formula.

MAE's `param_groups_lrd` counts `num_layers = depth + 1` (len(blocks) + 1) and gives a parameter the
layer id 0 (cls_token, pos_embed, patch_embed.*), i + 1 (blocks.i.*) or num_layers (everything
else: the final norm, fc_norm, head); its lr is scaled by decay ** (num_layers - layer_id).
The test re-derives the expected multiplier from timm-style parameter names, independently of the
package's path handling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax.models import heads, mae as mae_lib, vit
from mae_jax.train import lr_decay

DEPTH = 3
DECAY = 0.65


def _classifier(blur_embed="none"):
  spec = vit.ViTSpec(image_size=16, patch_size=8, in_chans=1, width=16, depth=DEPTH, num_heads=2)
  mae = mae_lib.MAE(spec, decoder_width=16, decoder_depth=1, decoder_heads=2, blur_embed=blur_embed,
                    rngs=nnx.Rngs(0))
  clf = heads.from_pretrained(mae, 3, kind="finetune", drop_path=0.1)
  return clf, nnx.to_pure_dict(nnx.state(clf, nnx.Param))


def _flat_names(params):
  """{'encoder.blocks.1.attn.qkv.kernel': array, ...}"""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out[".".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def _expected_multiplier(name: str) -> float:
  # MAE util/lr_decay.py, written out for timm names (our classifier nests the ViT under 'encoder').
  n = name[len("encoder."):] if name.startswith("encoder.") else name
  num_layers = DEPTH + 1
  if n in ("cls_token", "pos_embed", "blur_token") or n.startswith("patch_embed"):
    layer = 0
  elif n.startswith("blocks."):
    layer = int(n.split(".")[1]) + 1
  else:
    layer = num_layers
  return DECAY ** (num_layers - layer)


def test_multipliers_match_mae_formula():
  _, params = _classifier()
  mults = _flat_names(lr_decay.lr_multipliers(params, DEPTH, DECAY))
  names = set(mults)
  assert {"encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.kernel",
          "encoder.blocks.0.attn.qkv.kernel", "fc_norm.scale", "head.kernel", "head.bias"} <= names
  for name, m in mults.items():
    assert np.isclose(m, _expected_multiplier(name)), name
  # Spot values: embeddings decay^(depth+1), first block decay^depth, last block decay, head 1.
  assert np.isclose(mults["encoder.pos_embed"], DECAY ** 4)
  assert np.isclose(mults["encoder.cls_token"], DECAY ** 4)
  assert np.isclose(mults["encoder.patch_embed.proj.bias"], DECAY ** 4)
  assert np.isclose(mults["encoder.blocks.0.mlp.fc1.kernel"], DECAY ** 3)
  assert np.isclose(mults["encoder.blocks.2.norm2.scale"], DECAY)
  assert mults["head.kernel"] == 1.0 and mults["fc_norm.bias"] == 1.0 and mults["encoder.norm.scale"] == 1.0
  ids = _flat_names(lr_decay.layer_ids(params, DEPTH))
  assert ids["encoder.pos_embed"] == 0 and ids["encoder.blocks.1.attn.proj.bias"] == 2
  assert ids["head.kernel"] == DEPTH + 1


def test_blur_token_is_an_embedding_without_decay():
  _, params = _classifier("token")
  mults = _flat_names(lr_decay.lr_multipliers(params, DEPTH, DECAY))
  assert np.isclose(mults["blur_token"], DECAY ** 4)
  assert not _flat_names(lr_decay.weight_decay_mask(params))["blur_token"]


def test_weight_decay_mask():
  _, params = _classifier()
  flat = _flat_names(params)
  mask = _flat_names(lr_decay.weight_decay_mask(params))
  for name, leaf in flat.items():
    expected = leaf.ndim > 1 and name not in ("encoder.pos_embed", "encoder.cls_token")
    assert mask[name] == expected, name
  assert mask["head.kernel"] and mask["encoder.blocks.0.attn.qkv.kernel"]
  assert not mask["encoder.pos_embed"] and not mask["encoder.cls_token"]


def test_first_adamw_step_is_scaled_per_layer():
  """torch AdamW with per-group lr = scale·lr: the first step is −scale·lr·(g/(|g|+eps) + wd·p·[decay])."""
  _, params = _classifier()
  lr, wd, eps = 1e-2, 0.05, 1e-8
  tx = lr_decay.layerwise_adamw(lambda step: lr, params, depth=DEPTH, layer_decay=DECAY,
                                weight_decay=wd, eps=eps)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  flat_u, flat_g, flat_p = _flat_names(updates), _flat_names(grads), _flat_names(params)
  mask = _flat_names(lr_decay.weight_decay_mask(params))
  for name in flat_u:
    g, p = np.asarray(flat_g[name], np.float64), np.asarray(flat_p[name], np.float64)
    adam = g / (np.abs(g) + eps)
    expected = -lr * _expected_multiplier(name) * (adam + (wd * p if mask[name] else 0.0))
    np.testing.assert_allclose(np.asarray(flat_u[name]), expected, rtol=2e-5, atol=1e-9, err_msg=name)


def test_lars_masks_vectors():
  """MAE's LARS skips biases (trust ratio 1): a bias update is −lr·g; a matrix gets the trust ratio."""
  params = {"head": {"kernel": jnp.full((4, 3), 0.5), "bias": jnp.zeros((3,))}}
  grads = {"head": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), 2.0)}}
  tx = lr_decay.lars(lambda s: 0.1, params, momentum=0.9, trust_coefficient=0.001)
  upd, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(upd["head"]["bias"], -0.1 * 2.0, rtol=1e-6)
  trust = 0.001 * np.linalg.norm(np.full((4, 3), 0.5)) / np.linalg.norm(np.full((4, 3), 2.0))
  np.testing.assert_allclose(upd["head"]["kernel"], -0.1 * trust * 2.0, rtol=1e-5)
  assert isinstance(tx, optax.GradientTransformation)


def test_weight_decay_modes_follow_the_scanned_layout():
  """Every `train.no_decay` mode gives a scanned block stack the per-block layout's mask: a stacked
  bias has two axes but is still a bias."""
  clf, params = _classifier()
  scanned = heads.from_pretrained(mae_lib.MAE(clf.encoder.spec, decoder_width=16, decoder_depth=1,
                                              decoder_heads=2, rngs=nnx.Rngs(0)), 3,
                                  run={"scan_layers": True})
  sparams = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  for mode in lr_decay.NO_DECAY_MODES:
    plain = _flat_names(lr_decay.weight_decay_mask(params, mode))
    stacked = _flat_names(lr_decay.weight_decay_mask(sparams, mode))
    for name, decays in stacked.items():
      if ".blocks." in name:  # encoder.blocks.<leaf path>: block 0's entry in the plain tree
        head, tail = name.split(".blocks.")
        assert decays == plain[f"{head}.blocks.0.{tail}"], (mode, name)
      else:
        assert decays == plain[name], (mode, name)
    assert stacked["encoder.blocks.norm1.bias"] == (mode == "none")
