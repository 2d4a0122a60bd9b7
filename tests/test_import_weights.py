"""Import of released checkpoints (USFM / timm BEiT, official MAE) into a pretraining workdir:
features against timm / transformers on random weights in the official layouts."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.models.beit import Beit, gen_relative_position_index

from mae_jax import export, import_weights, models
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit
from mae_jax.train import core
from tests import torch_refs

MEAN, STD = import_weights.IMAGENET_MEAN, import_weights.IMAGENET_STD


def _randomise(model, seed, scale=0.3):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(scale * torch.randn_like(p))
  return model


def _gray(n=2, size=32, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, size, size, 1)).astype(np.float32)


def _rgb_normalised(x01):
  """The gray images repeated over RGB and normalised per channel, NCHW, as the checkpoint expects."""
  rgb = np.repeat(x01, 3, axis=-1)
  rgb = (rgb - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  return torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))


def _usfm_checkpoint(path, *, shared: bool, seed=0):
  """A state dict in USFM's layout (timm's names plus the persistent `relative_position_index`
  buffers of usdsgen's VisionTransformer), 3 channels, wrapped in {'model': ...}."""
  ref = Beit(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=32, depth=2, num_heads=2,
             qkv_bias=True, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=not shared,
             use_shared_rel_pos_bias=shared, global_pool="avg" if not shared else "token")
  ref = _randomise(ref.eval(), seed, scale=0.15)
  sd = dict(ref.state_dict())
  index = gen_relative_position_index((4, 4))
  for i in range(2):
    if not shared:
      sd[f"blocks.{i}.attn.relative_position_index"] = index
  torch.save({"model": sd, "epoch": 3}, path)
  return ref


def _features(workdir, x01):
  config, model, step = core.load_pretrained(workdir)
  with open(os.path.join(workdir, "data_stats.json")) as f:
    stats = json.load(f)
  x = (jnp.asarray(x01) - stats["mean"]) / stats["std"]
  return config, model, x


@pytest.mark.parametrize("shared", [False, True])
def test_usfm_layout_3_channels_imports_for_1_channel_data(tmp_path, shared, caplog):
  ckpt = tmp_path / "usfm.pth"
  ref = _usfm_checkpoint(ckpt, shared=shared)
  caplog.set_level("INFO", logger="mae_jax")
  wd = import_weights.main([f"--checkpoint={ckpt}", f"--workdir={tmp_path / 'wd'}"])
  assert "3-channel patch embedding -> 1 channel" in caplog.text
  x01 = _gray()
  config, model, x = _features(wd, x01)
  assert config.recipe == "usfm" and config.model.backbone == "beit" and config.model.in_chans == 1
  assert config.model.shared_rel_pos == shared
  with torch.no_grad():
    want = ref.forward_features(_rgb_normalised(x01)).numpy()
  enc = model.encoder
  tokens = jnp.concatenate([enc.cls(2), enc.embed(x)], axis=1)
  got = enc.transform(tokens) if shared else enc.transform(tokens, return_intermediates=True)[1][-1]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_shared_table_with_per_block_tables_is_refused(tmp_path):
  """A shared table makes a pretraining (shared) target; per-block tables beside it are refused, not
  silently dropped."""
  ckpt = tmp_path / "both.pth"
  _usfm_checkpoint(ckpt, shared=True)
  sd = import_weights.load_state_dict(str(ckpt))
  shared = sd["rel_pos_bias.relative_position_bias_table"]
  import_weights.import_state_dict(dict(sd))  # the shared table alone imports
  sd["blocks.1.attn.relative_position_bias_table"] = np.ones_like(shared)
  with pytest.raises(ValueError, match="per-block ones .*blocks.1.attn.relative_position_bias_table"):
    import_weights.import_state_dict(sd)


def test_usfm_layout_to_another_image_size(tmp_path):
  """224 -> other sizes: every relative table resampled as timm's checkpoint filter does it."""
  ckpt = tmp_path / "usfm.pth"
  ref = _usfm_checkpoint(ckpt, shared=False)
  wd = import_weights.main([f"--checkpoint={ckpt}", f"--workdir={tmp_path / 'wd'}", "--image_size=48",
                            "--in_chans=3"])
  big = Beit(img_size=48, patch_size=8, in_chans=3, num_classes=0, embed_dim=32, depth=2, num_heads=2,
             qkv_bias=True, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True).eval()
  from timm.models.beit import checkpoint_filter_fn
  big.load_state_dict(checkpoint_filter_fn(ref.state_dict(), big), strict=True)
  rgb = np.random.default_rng(1).standard_normal((2, 48, 48, 3)).astype(np.float32)
  config, model, _ = _features(wd, rgb)
  assert config.model.image_size == 48
  enc = model.encoder
  _, feats = enc.transform(jnp.concatenate([enc.cls(2), enc.embed(jnp.asarray(rgb))], axis=1),
                           return_intermediates=True)
  with torch.no_grad():
    want = big.forward_features(torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(feats[-1]), want, atol=1e-5, rtol=0)


def test_official_mae_encoder_layout(tmp_path):
  """`mae_pretrain_vit_*.pth`: timm ViT names, the fixed sin-cos pos_embed, 3 channels."""
  ref = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                          in_chans=3, embed_dim=64, depth=4, num_heads=4, num_classes=0,
                          global_pool="token").eval()
  _randomise(ref, 2, scale=0.1)
  with torch.no_grad():
    ref.pos_embed.copy_(torch.from_numpy(vit.sincos_2d(64, (4, 4))[None]))
  ckpt = tmp_path / "mae_pretrain_vit_tiny.pth"
  torch.save({"model": ref.state_dict()}, ckpt)
  wd = import_weights.main([f"--checkpoint={ckpt}", f"--workdir={tmp_path / 'wd'}"])
  x01 = _gray(seed=2)
  config, model, x = _features(wd, x01)
  assert config.recipe == "mae" and config.model.variant == "tiny" and config.model.backbone == "vit"
  with torch.no_grad():
    want = ref.forward_features(_rgb_normalised(x01)).numpy()
  np.testing.assert_allclose(np.asarray(model.encoder(x)), want, atol=1e-5, rtol=0)
  notes = json.loads((tmp_path / "wd" / "import.json").read_text())["notes"]
  assert any("decoder" in n and "initialisation" in n for n in notes)

  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  sd["pos_embed"] = sd["pos_embed"] + 0.1  # a learned table is refused, not silently replaced
  with pytest.raises(ValueError, match="sin-cos"):
    import_weights.import_state_dict(sd)


def test_official_mae_visualize_checkpoint_with_decoder(tmp_path):
  """`mae_visualize_vit_*.pth`: encoder + decoder; loss and prediction equal transformers' ViTMAE."""
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=64, depth=4, num_heads=4)
  dec = dict(decoder_width=32, decoder_depth=2, decoder_heads=16)
  src = mae_lib.MAE(spec, rngs=__import__("flax").nnx.Rngs(5), **dec)
  sd = export.mae_state_dict(src)
  rng = np.random.default_rng(3)
  sd = {k: (v if "pos_embed" in k else v + 0.05 * rng.standard_normal(v.shape).astype(np.float32))
        for k, v in sd.items()}
  ckpt = tmp_path / "mae_visualize.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, ckpt)
  wd = import_weights.main([f"--checkpoint={ckpt}", f"--workdir={tmp_path / 'wd'}", "--mean=0", "--std=1"])
  config, model, _ = core.load_pretrained(wd)
  assert (config.model.decoder_width, config.model.decoder_depth) == (32, 2)
  ref = torch_refs.hf_vitmae(spec, mask_ratio=0.75, norm_pix_loss=False, **dec)
  ref.load_state_dict(torch_refs.official_to_hf(sd), strict=True)
  images = rng.normal(size=(2, 32, 32, 1)).astype(np.float32)
  noise = rng.uniform(size=(2, 16)).astype(np.float32)
  loss, pred, _ = model(jnp.asarray(images), noise=jnp.asarray(noise))
  with torch.no_grad():
    out = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
  assert abs(float(loss) - out.loss.item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), atol=1e-5, rtol=0)


def test_import_refuses_bad_input(tmp_path):
  with pytest.raises(SystemExit, match="does not exist"):
    import_weights.main([f"--checkpoint={tmp_path / 'nope.pth'}", f"--workdir={tmp_path / 'wd'}"])
  torch.save({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "x.pth")
  with pytest.raises(SystemExit, match="neither"):
    import_weights.main([f"--checkpoint={tmp_path / 'x.pth'}", f"--workdir={tmp_path / 'wd'}"])
  assert models.BACKBONES == ("vit", "beit")
