"""UperNet on the ViT (USFM §4.1.2): pyramid shapes for ViT-B/16 at 224 (abstractly, nothing big is
computed) and for the smoke model, the block features, the head against a torch (mmseg-style)
reference, and the optimiser groups."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from mae_jax import models
from mae_jax.models import upernet, vit
from mae_jax.train import lr_decay
from tests.conftest import load_config

TINY = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=16, depth=4, num_heads=2)


# ------------------------------------------------------------------------------------- shapes


def test_vit_b16_224_pyramid_shapes_abstract():
  def build():
    return upernet.Segmenter(vit.Encoder(vit.ViTSpec(), rngs=nnx.Rngs(0)), 2, channels=512,
                             drop_path=0.1)

  seg = nnx.eval_shape(build)
  assert seg.blocks == (3, 5, 7, 11) and len(seg.encoder.blocks) == 11 and seg.encoder.norm is None
  graphdef, state = nnx.split(seg)
  x = jax.ShapeDtypeStruct((2, 224, 224, 1), jnp.float32)
  feats, pyr, logits = jax.eval_shape(
      lambda s, x: (lambda m: (m.features(x), m.pyramid(x), m(x)))(nnx.merge(graphdef, s)), state, x)
  assert [f.shape for f in feats] == [(2, 14, 14, 768)] * 4
  # 1/4, 1/8, 1/16, 1/32 of 224.
  assert [p.shape for p in pyr] == [(2, 56, 56, 768), (2, 28, 28, 768), (2, 14, 14, 768), (2, 7, 7, 768)]
  assert upernet.pyramid_shapes(224, 16, 768) == [p.shape[1:] for p in pyr]
  assert logits.shape == (2, 224, 224, 2) and logits.dtype == jnp.float32
  # BEiT's fpn1..fpn4: two deconvs (with a norm between them), one deconv, identity, 2x2 max-pool.
  assert [(n.plan.up, n.plan.pool, len(n.norms)) for n in seg.necks] == [
      (2, 1, 1), (1, 1, 0), (0, 1, 0), (0, 2, 0)]
  head = seg.head
  assert head.cls.kernel.shape == (1, 1, 512, 2)
  assert head.fpn_bottleneck.conv.kernel.shape == (3, 3, 2048, 512)
  assert head.bottleneck.conv.kernel.shape == (3, 3, 768 + 4 * 512, 512)


def test_smoke_model_pyramid_shapes():
  pcfg = load_config("mae", "smoke")
  scfg = load_config("segment", "smoke")
  model = models.build_pretrain_model(pcfg.model)
  m = scfg.model
  seg = upernet.from_pretrained(model, 2, channels=m.channels, norm_groups=m.norm_groups,
                                dropout=m.dropout, drop_path=m.drop_path)
  assert seg.blocks == (1, 1, 1, 2)  # 2-block micro: USFM's relative depths, rounded, at least 1
  x = jnp.zeros((3, 32, 32, 1))
  pyr, logits = nnx.jit(lambda s, x: (s.pyramid(x), s(x)))(seg, x)
  assert [p.shape for p in pyr] == [(3, 8, 8, 32), (3, 4, 4, 32), (3, 2, 2, 32), (3, 1, 1, 32)]
  assert logits.shape == (3, 32, 32, 2)
  # Segmenting at twice the pretraining size: the position table is resized, the pyramid follows.
  big = upernet.from_pretrained(model, 2, channels=8, norm_groups=4, image_size=64)
  assert big.encoder.pos_embed.shape == (1, 1 + 64, 32)
  pyr = nnx.jit(lambda s, x: s.pyramid(x))(big, jnp.zeros((1, 64, 64, 1)))
  assert [p.shape[1:3] for p in pyr] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_feature_blocks_and_level_plans():
  assert upernet.feature_blocks(12) == (3, 5, 7, 11)
  assert upernet.feature_blocks(2) == (1, 1, 1, 2)
  assert upernet.feature_blocks(4) == (1, 2, 2, 4)
  assert upernet.feature_blocks(24) == (6, 10, 14, 22)
  assert upernet.feature_blocks(12, (4, 6, 8, 12)) == (4, 6, 8, 12)
  with pytest.raises(ValueError, match="model.blocks"):
    upernet.feature_blocks(12, (1, 2, 3, 13))
  # ViT-H/14 at 224: powers of two up / down, then a bilinear resize onto 224 / s.
  plans = upernet.level_plans(224, 14)
  assert [(p.up, p.pool, p.size, p.resize) for p in plans] == [(2, 1, 56, True), (1, 1, 28, True),
                                                                (0, 1, 14, True), (0, 2, 7, True)]
  with pytest.raises(ValueError, match="image_size"):
    upernet.level_plans(16, 8)


# ------------------------------------------------------------------------------------ features


def test_features_are_the_block_outputs_of_the_pretrained_encoder():
  enc = vit.Encoder(TINY, rngs=nnx.Rngs(3))
  seg = upernet.Segmenter(enc, 3, channels=8, norm_groups=4, blocks=(1, 2, 2, 3))
  assert len(seg.encoder.blocks) == 3  # block 4 cannot reach the output
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  _, inter = nnx.jit(lambda e, x: e(x, return_intermediates=True))(enc, x)
  feats = nnx.jit(lambda s, x: s.features(x))(seg, x)
  for f, b in zip(feats, (1, 2, 2, 3)):
    ref = np.asarray(inter[b - 1][:, 1:]).reshape(2, 4, 4, 16)  # patch tokens, row-major grid
    np.testing.assert_allclose(f, ref, atol=1e-5)
  # Drop path keeps the full-depth ramp (timm: linspace over all 4 blocks).
  dp = upernet.Segmenter(enc, 2, channels=8, norm_groups=4, drop_path=0.3, blocks=(1, 1, 2, 3))
  assert [b.drop_path_rate for b in dp.encoder.blocks] == pytest.approx(list(np.linspace(0, 0.3, 4)[:3]))


def test_resize_pos_embed_keeps_cls_and_constants():
  table = jnp.concatenate([jnp.full((1, 1, 8), 7.0), jnp.ones((1, 16, 8))], axis=1)
  out = upernet.resize_pos_embed(table, (4, 4), (6, 6))
  assert out.shape == (1, 37, 8)
  np.testing.assert_allclose(out[:, 0], 7.0)
  np.testing.assert_allclose(out[:, 1:], 1.0, atol=1e-6)
  np.testing.assert_array_equal(upernet.resize_pos_embed(table, (4, 4), (4, 4)), table)


# ----------------------------------------------------------------------- head vs. a torch model


def _t(x):
  return torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2)


def _w(conv):  # flax (kh, kw, cin, cout) -> torch (cout, cin, kh, kw)
  return torch.tensor(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy())


def _conv_module(m, x, groups):
  """mmseg ConvModule(conv, norm, ReLU) with GroupNorm in place of BatchNorm."""
  k = m.conv.kernel.shape[0]
  y = F.conv2d(x, _w(m.conv), padding=k // 2)
  y = F.group_norm(y, groups, torch.tensor(np.asarray(m.norm.scale[...])),
                   torch.tensor(np.asarray(m.norm.bias[...])), eps=1e-5)
  return F.relu(y)


def _up(x, size):
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _torch_segmenter(seg, feats, out_size, groups):
  """BEiT's fpn1..fpn4 + mmseg's UPerHead, written with torch.nn.functional."""
  levels = []
  for neck, f in zip(seg.necks, feats):
    x = _t(f)
    for i, d in enumerate(neck.deconvs):
      if i:
        n = neck.norms[i - 1]
        x = F.gelu(F.group_norm(x, groups, torch.tensor(np.asarray(n.scale[...])),
                                torch.tensor(np.asarray(n.bias[...])), eps=1e-5))
      # flax's ConvTranspose (transpose_kernel=False) is torch's with the kernel flipped in space.
      w = torch.tensor(np.asarray(d.kernel[...])[::-1, ::-1].transpose(2, 3, 0, 1).copy())
      x = F.conv_transpose2d(x, w, torch.tensor(np.asarray(d.bias[...])), stride=2)
    if neck.plan.pool > 1:
      x = F.max_pool2d(x, neck.plan.pool, neck.plan.pool)
    levels.append(x)
  h = seg.head
  top = levels[-1]
  psp = [top] + [_up(_conv_module(c, F.adaptive_avg_pool2d(top, s), groups), top.shape[2:])
                 for s, c in zip(h.pool_scales, h.ppm)]
  lat = [_conv_module(c, x, groups) for c, x in zip(h.lateral, levels[:-1])]
  lat.append(_conv_module(h.bottleneck, torch.cat(psp, 1), groups))
  for i in range(len(lat) - 1, 0, -1):
    lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[2:])
  outs = [_conv_module(c, x, groups) for c, x in zip(h.fpn, lat[:-1])] + [lat[-1]]
  outs = [outs[0]] + [_up(o, outs[0].shape[2:]) for o in outs[1:]]
  x = _conv_module(h.fpn_bottleneck, torch.cat(outs, 1), groups)
  x = F.conv2d(x, _w(h.cls), torch.tensor(np.asarray(h.cls.bias[...])))
  return _up(x, out_size).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("image_size,patch,pool_scales", [(64, 16, (1, 2, 3, 6)), (32, 8, (1, 2, 3, 6))])
def test_head_matches_torch_reference(image_size, patch, pool_scales):
  spec = dataclasses.replace(TINY, image_size=image_size, patch_size=patch, depth=2)
  seg = upernet.Segmenter(vit.Encoder(spec, rngs=nnx.Rngs(1)), 3, channels=8, norm_groups=4,
                          pool_scales=pool_scales, seed=2)
  # Non-trivial norm parameters and bias, so that a mix-up of them would show.
  state = nnx.state(seg, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(seg, jax.tree.unflatten(treedef, leaves))
  x = jax.random.normal(jax.random.key(0), (2, image_size, image_size, 1))
  feats = nnx.jit(lambda s, x: s.features(x))(seg, x)
  ours = nnx.jit(lambda s, x: s(x))(seg, x)
  ref = _torch_segmenter(seg, feats, (image_size, image_size), groups=4)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  # Dropout (channel-wise) only with a key.
  seg.head.dropout = 0.5
  a, b = nnx.jit(lambda s, x, k: (s(x, key=k), s(x)))(seg, x, jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_allclose(b, ours, atol=1e-6)


def test_adaptive_pool_matches_torch_for_every_size():
  for h in (1, 2, 5, 7):
    x = np.random.default_rng(h).normal(size=(1, h, h + 1, 3)).astype(np.float32)
    for bins in (1, 2, 3, 6):
      ours = upernet.adaptive_avg_pool(jnp.asarray(x), bins)
      ref = F.adaptive_avg_pool2d(_t(x), bins).permute(0, 2, 3, 1).numpy()
      np.testing.assert_allclose(ours, ref, atol=1e-6)


# ---------------------------------------------------------------------------- optimiser groups


def test_layer_decay_uses_the_pretrained_depth_and_spares_the_head():
  seg = upernet.Segmenter(vit.Encoder(TINY, rngs=nnx.Rngs(0)), 2, channels=8, norm_groups=4,
                          blocks=(1, 2, 2, 3))
  params = nnx.to_pure_dict(nnx.state(seg, nnx.Param))
  mult = lr_decay.lr_multipliers(params, depth=seg.full_depth, decay=0.5)
  # MAE / mmseg: block i (0-based) gets decay^(depth - i), embeddings decay^(depth + 1), the rest 1.
  assert mult["encoder"]["blocks"][2]["attn"]["qkv"]["kernel"] == pytest.approx(0.5**2)
  assert mult["encoder"]["blocks"][0]["mlp"]["fc1"]["bias"] == pytest.approx(0.5**4)
  assert mult["encoder"]["pos_embed"] == pytest.approx(0.5**5)
  assert mult["encoder"]["patch_embed"]["proj"]["kernel"] == pytest.approx(0.5**5)
  assert set(jax.tree.leaves(mult["head"])) == {1.0} and set(jax.tree.leaves(mult["necks"])) == {1.0}
  wd = lr_decay.weight_decay_mask(params)
  assert wd["head"]["cls"]["kernel"] and not wd["head"]["cls"]["bias"]
  assert not wd["head"]["fpn"][0]["norm"]["scale"] and not wd["encoder"]["pos_embed"]
