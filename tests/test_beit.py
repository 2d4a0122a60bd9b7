"""USFM's BEiT-style encoder (mae_jax/models/beit.py) against timm's `Beit` on shared random weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
from timm.models.beit import Beit

from mae_jax import config_files, import_weights, models
from mae_jax.models import beit, heads, upernet

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True,
            init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True)


def _timm(seed=0, **kw):
  torch.manual_seed(seed)
  args = {**TINY, "in_chans": 1, "num_classes": 0, **kw}
  ref = Beit(**args).eval()
  with torch.no_grad():  # every tensor random: zero tables / unit gammas would hide a swapped tensor
    for p in ref.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  return ref


def _sd(ref):
  return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _images(n=3, size=32, c=1, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, c)).astype(np.float32)


def _torch_in(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_relative_position_index_equals_timm():
  from timm.models.beit import gen_relative_position_index
  for grid in [(4, 4), (3, 5)]:
    np.testing.assert_array_equal(beit.relative_position_index(grid),
                                  gen_relative_position_index(grid).numpy())


def test_per_block_bias_matches_timm_features_and_logits():
  ref = _timm(num_classes=3, global_pool="avg")  # USFM: mean pooling through fc_norm
  assert ref.blocks[0].attn.k_bias is not None and "blocks.0.attn.k_bias" not in ref.state_dict()
  config, model, _, _ = import_weights.import_state_dict(_sd(ref), in_chans=1, mean=0.0, std=1.0,
                                                         src_mean=(0.0,), src_std=(1.0,))
  assert config.model.backbone == "beit" and not config.model.shared_rel_pos
  x = _images()
  with torch.no_grad():
    want_tokens = ref.forward_features(_torch_in(x)).numpy()  # norm is Identity with fc_norm
    want_logits = ref(_torch_in(x)).numpy()
  enc = model.encoder
  tokens = jnp.concatenate([enc.cls(3), enc.embed(jnp.asarray(x))], axis=1)
  _, feats = enc.transform(tokens, return_intermediates=True)
  np.testing.assert_allclose(np.asarray(feats[-1]), want_tokens, atol=1e-5, rtol=0)
  clf = heads.Classifier(enc, 3, global_pool="avg")
  clf.fc_norm.scale[...] = jnp.asarray(ref.fc_norm.weight.detach().numpy())
  clf.fc_norm.bias[...] = jnp.asarray(ref.fc_norm.bias.detach().numpy())
  clf.head.kernel[...] = jnp.asarray(ref.head.weight.detach().numpy().T)
  clf.head.bias[...] = jnp.asarray(ref.head.bias.detach().numpy())
  np.testing.assert_allclose(np.asarray(clf(jnp.asarray(x))), want_logits, atol=1e-5, rtol=0)


def test_shared_bias_matches_timm_and_expands_per_block():
  ref = _timm(seed=1, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token")
  config, model, _, _ = import_weights.import_state_dict(_sd(ref), in_chans=1, mean=0.0, std=1.0,
                                                         src_mean=(0.0,), src_std=(1.0,))
  assert config.model.shared_rel_pos and model.encoder.rel_pos_bias is not None
  x = _images(seed=1)
  with torch.no_grad():
    want = ref.forward_features(_torch_in(x)).numpy()  # with the final norm
  np.testing.assert_allclose(np.asarray(model.encoder(jnp.asarray(x))), want, atol=1e-5, rtol=0)
  # The downstream copy holds one table per block (USFM's loader copies the shared one) and computes
  # the same function.
  ft = model.encoder.finetune_copy()
  assert ft.rel_pos_bias is None and ft.blocks[1].attn.relative_position_bias_table is not None
  np.testing.assert_allclose(np.asarray(ft(jnp.asarray(x))), want, atol=1e-5, rtol=0)


def test_patch_embedding_starts_as_usfms():
  """USFM's backbone `_init_weights` re-initialises the patch Conv2d: trunc_normal(std 0.02; timm's
  cut at ±2 is ±100σ there, so a plain normal) and a zero bias."""
  spec = models.vit_spec(config_files.load("usfm", "smoke").model)
  spec = dataclasses.replace(spec, width=256)  # 64·256 kernel samples
  enc = beit.Encoder(spec, rngs=nnx.Rngs(3))
  k = np.asarray(enc.patch_embed.proj.kernel[...])
  assert k.shape == (spec.patch_dim, spec.width)
  assert abs(k.std() - 0.02) < 0.02 * 0.05 and abs(k.mean()) < 0.02 * 0.05
  np.testing.assert_array_equal(np.asarray(enc.patch_embed.proj.bias[...]), 0.0)


def test_kept_tokens_bias_is_the_full_grid_bias_restricted():
  """MAE path: the tokens at ids_keep attend with the bias of their grid positions. With every token
  kept in a shuffled order the output is the full forward, shuffled the same way."""
  spec = models.vit_spec(config_files.load("usfm", "smoke").model)
  enc = beit.Encoder(spec, options=beit.BeitOptions(shared_rel_pos=True), rngs=nnx.Rngs(0))
  state = nnx.state(enc, nnx.Param)
  leaves, tdef = jax.tree.flatten(state)
  rng = np.random.default_rng(0)
  nnx.update(enc, jax.tree.unflatten(tdef, [x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
                                           for x in leaves]))
  x = jnp.asarray(_images(2))
  full = np.asarray(enc(x))
  perm = np.stack([rng.permutation(spec.num_patches) for _ in range(2)])
  kept = enc.embed_kept(x, jnp.asarray(perm))
  out = np.asarray(enc.transform(jnp.concatenate([enc.cls(2), kept], axis=1), ids_keep=jnp.asarray(perm)))
  np.testing.assert_allclose(out[:, 0], full[:, 0], atol=1e-5)
  np.testing.assert_allclose(out[:, 1:], np.take_along_axis(full[:, 1:], perm[:, :, None], axis=1),
                             atol=1e-5)


@pytest.mark.parametrize("grid_in,grid_out", [((4, 4), (6, 6)), ((7, 7), (5, 5))])
def test_resize_relative_table_equals_timm(grid_in, grid_out):
  n = beit.num_relative_distance(grid_in)
  table = np.random.default_rng(0).standard_normal((n, 3)).astype(np.float32)
  want = resize_rel_pos_bias_table(torch.from_numpy(table), new_window_size=grid_out,
                                   new_bias_shape=(beit.num_relative_distance(grid_out), 3)).numpy()
  np.testing.assert_allclose(beit.resize_relative_table(table, grid_in, grid_out), want, atol=1e-5)


@pytest.mark.parametrize("path", ["simmim", "mae"])
def test_pretraining_models_and_heads_run_on_beit(path):
  c = config_files.load("usfm" if path == "simmim" else "mae", "smoke", {"model.backbone": "beit"})
  model = models.build_pretrain_model(c.model, seed=0)
  assert isinstance(model.encoder, beit.Encoder)
  x = jnp.asarray(_images(2))
  loss, pred, _ = model(x, key=jax.random.key(0))
  assert np.isfinite(float(loss)) and pred.shape[:2] == (2, model.spec.num_patches)
  if path == "simmim":
    return
  probe = heads.from_pretrained(model, 3, kind="linear_probe")
  assert probe(x).shape == (2, 3)
  seg = upernet.from_pretrained(model, 2, channels=8, norm_groups=4, image_size=40)
  assert seg.encoder.blocks[0].attn.relative_position_bias_table.shape == (
      beit.num_relative_distance((5, 5)), 2)
  assert jax.jit(lambda m, v: m(v))(seg, jnp.asarray(_images(1, size=40))).shape == (1, 40, 40, 2)
  with pytest.raises(ValueError, match="blur_embed='token'"):
    models.build_pretrain_model(config_files.load("mae", "smoke", {"model.backbone": "beit",
                                                                    "model.blur_embed": "token"}).model)
  with pytest.raises(ValueError, match="model.backbone"):
    models.build_pretrain_model(config_files.load("mae", "smoke", {"model.backbone": "swin"}).model)


def _perturbed(model, seed=0, scale=0.1):
  state = nnx.state(model, nnx.Param)
  leaves, tdef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.unflatten(tdef, [x + scale * rng.standard_normal(x.shape).astype(np.float32)
                                             for x in leaves]))
  return model


def _load_exported(paths):
  import json

  import safetensors.torch
  import timm
  with open(paths["timm_json"]) as f:
    cfg = json.load(f)
  ref = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).eval()
  ref.load_state_dict(safetensors.torch.load_file(paths["weights"]), strict=True)
  return ref


def test_export_to_timm_beit_strict(tmp_path):
  """Export back to the USFM / timm-BEiT layout: a strict load into timm's Beit, equal features; the
  pretraining encoder keeps its shared table, a fine-tuned classifier has one per block."""
  from mae_jax import export
  c = config_files.load("usfm", "smoke")
  model = _perturbed(models.build_pretrain_model(c.model, seed=0))
  paths = export.export_model(model, c, "timm", str(tmp_path / "usfm.safetensors"))
  ref = _load_exported(paths)
  assert ref.rel_pos_bias is not None
  x = _images(2)
  with torch.no_grad():
    want = ref.forward_features(_torch_in(x)).numpy()
  np.testing.assert_allclose(np.asarray(model.encoder(jnp.asarray(x))), want, atol=1e-4, rtol=0)

  clf = _perturbed(heads.from_pretrained(model, 3, kind="finetune"), seed=1)
  paths = export.export_model(clf, c, "timm", str(tmp_path / "clf.safetensors"))
  ref = _load_exported(paths)
  assert ref.rel_pos_bias is None and ref.blocks[0].attn.relative_position_bias_table is not None
  with torch.no_grad():
    want = ref(_torch_in(x)).numpy()
  np.testing.assert_allclose(np.asarray(clf(jnp.asarray(x))), want, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="BEiT backbone"):
    export.export_model(model, c, "mae-finetune", str(tmp_path / "m.pth"))
