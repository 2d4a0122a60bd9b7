"""Export to PyTorch, checked numerically against timm and transformers (docs/methods.md#export, issue 5)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import safetensors.torch
import timm
import torch
from flax import nnx

from mae_jax import config_files, export
from mae_jax import models
from mae_jax.models import heads
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit
from mae_jax.train import checkpoint, core
from tests import torch_refs
from tests.conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEC = dict(decoder_width=32, decoder_depth=2, decoder_heads=4)


def _perturb(model, seed=0, scale=0.05):
  """Random offsets on every trainable parameter, so LayerNorms are not (1, 0), biases not 0 and a
  swapped or mis-transposed tensor cannot hide behind a symmetric initialisation."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  leaves = [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32))
            for x in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _mae(spec, seed=0, **kw):
  return _perturb(mae_lib.MAE(spec, rngs=nnx.Rngs(seed), **DEC, **kw), seed)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _load_timm(paths, *, strict=True):
  with open(paths["timm_json"]) as f:
    cfg = json.load(f)
  model = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).eval()
  model.load_state_dict(safetensors.torch.load_file(paths["weights"]), strict=strict)
  return model, cfg


# ------------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("in_chans,image_size,patch", [(1, 32, 8), (3, 40, 8), (1, 48, 12)])
def test_timm_forward_features_match_flax(tmp_path, in_chans, image_size, patch):
  spec = vit.ViTSpec(image_size=image_size, patch_size=patch, in_chans=in_chans, width=48, depth=2,
                     num_heads=4)
  model = _mae(spec)
  paths = export.export_model(model, None, "timm", str(tmp_path / "enc.safetensors"))
  ref, cfg = _load_timm(paths)
  assert cfg["kwargs"]["img_size"] == image_size and cfg["kwargs"]["patch_size"] == patch
  assert "mask_token" not in safetensors.numpy.load_file(paths["weights"])

  images = np.random.default_rng(1).normal(size=(2, image_size, image_size, in_chans)).astype(np.float32)
  ours = np.asarray(model.encoder(jnp.asarray(images)))
  with torch.no_grad():
    theirs = ref.forward_features(_nchw(images)).numpy()
  assert theirs.shape == ours.shape == (2, 1 + spec.num_patches, 48)
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_timm_gray_model_as_rgb(tmp_path):
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=48, depth=2, num_heads=4)
  model = _mae(spec, seed=2)
  paths = export.export_model(model, None, "timm", str(tmp_path / "rgb.safetensors"), in_chans_out=3)
  ref, cfg = _load_timm(paths)
  assert cfg["kwargs"]["in_chans"] == 3
  gray = np.random.default_rng(2).uniform(size=(2, 32, 32, 1)).astype(np.float32)
  ours = np.asarray(model.encoder(jnp.asarray(gray)))
  with torch.no_grad():
    theirs = ref.forward_features(_nchw(np.repeat(gray, 3, axis=-1))).numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_standard_size_gets_timm_name():
  cfg = export.timm_config(vit.ViTSpec.from_preset("b", image_size=224, in_chans=1))
  assert cfg["model_name"] == "vit_base_patch16_224"
  assert cfg["kwargs"]["in_chans"] == 1 and cfg["kwargs"]["num_classes"] == 0


# --------------------------------------------------------------------------------------- mae-full


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_full_reproduces_loss_in_transformers(tmp_path, norm_pix):
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=48, depth=2, num_heads=4)
  model = _mae(spec, seed=3, norm_pix_loss=norm_pix)
  paths = export.export_model(model, None, "mae-full", str(tmp_path / "full.pth"))
  sd = torch.load(paths["weights"], map_location="cpu", weights_only=True)["model"]

  # Exactly the keys of the official MaskedAutoencoderViT (pos tables included, no extras).
  want = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
          "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
          "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
  blk = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
  for prefix, n in (("blocks", spec.depth), ("decoder_blocks", DEC["decoder_depth"])):
    want |= {f"{prefix}.{i}.{b}.{w}" for i in range(n) for b in blk for w in ("weight", "bias")}
  assert set(sd) == want
  assert sd["patch_embed.proj.weight"].shape == (48, 1, 8, 8)

  ref = torch_refs.hf_vitmae(spec, mask_ratio=0.75, norm_pix_loss=norm_pix, **DEC)
  ref.load_state_dict(torch_refs.official_to_hf({k: v.numpy() for k, v in sd.items()}), strict=True)
  rng = np.random.default_rng(3)
  images = rng.normal(size=(3, 32, 32, 1)).astype(np.float32)
  noise = rng.uniform(size=(3, spec.num_patches)).astype(np.float32)
  loss, _, _ = model(jnp.asarray(images), noise=jnp.asarray(noise))
  with torch.no_grad():
    out = ref(_nchw(images), noise=torch.from_numpy(noise))
  assert abs(float(loss) - out.loss.item()) <= 1e-5


# ----------------------------------------------------------------------------------- mae-finetune


def _official_finetune_load(ckpt_path, spec, *, global_pool: bool, num_classes=5):
  """main_finetune.py's --finetune logic on a timm ViT (models_vit.VisionTransformer is timm's)."""
  model = timm.models.vision_transformer.VisionTransformer(
      img_size=spec.image_size, patch_size=spec.patch_size, in_chans=spec.in_chans,
      embed_dim=spec.width, depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4.0,
      qkv_bias=True, num_classes=num_classes, global_pool="avg" if global_pool else "token")
  checkpoint_model = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
  state_dict = model.state_dict()
  for k in ["head.weight", "head.bias"]:
    if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
      del checkpoint_model[k]
  assert checkpoint_model["pos_embed"].shape == state_dict["pos_embed"].shape  # no interpolation
  msg = model.load_state_dict(checkpoint_model, strict=False)
  return model, msg


def test_mae_finetune_passes_official_key_check(tmp_path):
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=48, depth=2, num_heads=4)
  model = _mae(spec, seed=4)
  paths = export.export_model(model, None, "mae-finetune", str(tmp_path / "ft.pth"))
  _, msg = _official_finetune_load(paths["weights"], spec, global_pool=True)
  assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
  assert set(msg.unexpected_keys) == {"norm.weight", "norm.bias"}  # dropped by global pooling
  _, msg = _official_finetune_load(paths["weights"], spec, global_pool=False)
  assert set(msg.missing_keys) == {"head.weight", "head.bias"} and not msg.unexpected_keys


# ------------------------------------------------------------------------------------- classifier


class StandInClassifier(nnx.Module):
  """What MAE fine-tuning builds: mean of the patch tokens (no CLS, no final norm) -> fc_norm -> head."""

  def __init__(self, spec, num_classes, *, rngs):
    self.encoder = vit.Encoder(spec, learnable_pos=True, rngs=rngs)
    self.fc_norm = nnx.LayerNorm(spec.width, epsilon=1e-6, rngs=rngs)
    self.head = nnx.Linear(spec.width, num_classes, rngs=rngs)

  def __call__(self, images):
    x = self.encoder.embed(images)
    x = jnp.concatenate([self.encoder.cls(x.shape[0]), x], axis=1)
    for blk in self.encoder.blocks:
      x = blk(x)
    return self.head(self.fc_norm(x[:, 1:].mean(axis=1)))


@pytest.mark.parametrize("in_chans_out", [None, 3])
def test_classifier_logits_match_timm(tmp_path, in_chans_out):
  spec = vit.ViTSpec(image_size=40, patch_size=8, in_chans=1, width=48, depth=2, num_heads=4)
  clf = _perturb(StandInClassifier(spec, 7, rngs=nnx.Rngs(5)), seed=5, scale=0.1)
  sd = export.classifier_state_dict(clf)
  assert "fc_norm.weight" in sd and "head.bias" in sd and "norm.weight" not in sd
  paths = export.export_model(clf, None, "timm", str(tmp_path / "clf.safetensors"),
                              in_chans_out=in_chans_out)
  ref, cfg = _load_timm(paths)
  assert cfg["kwargs"]["global_pool"] == "avg" and cfg["kwargs"]["num_classes"] == 7
  images = np.random.default_rng(5).uniform(size=(3, 40, 40, 1)).astype(np.float32)
  ours = np.asarray(clf(jnp.asarray(images)))
  torch_in = np.repeat(images, 3, axis=-1) if in_chans_out == 3 else images
  with torch.no_grad():
    theirs = ref(_nchw(torch_in)).numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  if in_chans_out is None:  # the .pth has the key set of MAE's global-pool fine-tuning model
    pth = export.export_model(clf, None, "mae-finetune", str(tmp_path / "clf_ft.pth"))["weights"]
    ref.load_state_dict(torch.load(pth, weights_only=True)["model"], strict=True)


# ----------------------------------------------------------------------------------- linear probe


def _torch_probe(paths, num_features, *, strict=True):
  """timm's ViT with MAE main_linprobe.py's head, built here from torch modules, not from the
  export's own description of it."""
  with open(paths["timm_json"]) as f:
    cfg = json.load(f)
  model = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"])
  model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(num_features, affine=False, eps=1e-6),
                                   model.head)
  model.load_state_dict(safetensors.torch.load_file(paths["weights"]), strict=strict)
  return model.eval(), cfg


def _set_bn_stats(probe, seed):
  """Running statistics far from the (0, 1) initialisation, so dropping them cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  d = probe.bn.mean.shape[0]
  probe.bn.mean[...] = jnp.asarray(rng.normal(0.0, 0.5, d), jnp.float32)
  probe.bn.var[...] = jnp.asarray(rng.uniform(0.05, 3.0, d), jnp.float32)


def _torch_logits(model, images, in_chans_out=None):
  x = np.repeat(images, 3, axis=-1) if in_chans_out == 3 else images
  with torch.no_grad():
    return model(_nchw(x)).numpy()


@pytest.mark.parametrize("in_chans_out", [None, 3])
def test_linear_probe_logits_match_timm_with_bn_head(tmp_path, in_chans_out):
  spec = vit.ViTSpec(image_size=40, patch_size=8, in_chans=1, width=48, depth=2, num_heads=4)
  probe = heads.from_pretrained(_mae(spec, seed=6), 5, kind="linear_probe")
  _perturb(probe, seed=6, scale=0.1)
  _set_bn_stats(probe, seed=6)
  paths = export.export_model(probe, None, "timm", str(tmp_path / "lp.safetensors"),
                              in_chans_out=in_chans_out, extras={"source": {"step": 17}})
  sd = safetensors.numpy.load_file(paths["weights"])
  assert {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight",
          "head.1.bias", "norm.weight"} <= set(sd) and not any(k.startswith("fc_norm") for k in sd)
  assert int(sd["head.0.num_batches_tracked"]) == 17
  ref, cfg = _torch_probe(paths, 48)
  assert cfg["kwargs"]["global_pool"] == "token" and cfg["kwargs"]["num_classes"] == 5
  assert cfg["head"]["modules"][0] == {"type": "BatchNorm1d", "num_features": 48, "affine": False,
                                       "eps": 1e-6}

  images = np.random.default_rng(6).uniform(size=(4, 40, 40, 1)).astype(np.float32)
  ours = np.asarray(probe(jnp.asarray(images)))  # eval mode: the running statistics
  theirs = _torch_logits(ref, images, in_chans_out)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  # The statistics carry the result: torch's default (0, 1) statistics give other logits.
  ref.head[0].reset_running_stats()
  assert np.abs(_torch_logits(ref, images, in_chans_out) - ours).max() > 1e-2

  # The .pth is what main_linprobe.py saves and its --eval --resume loads (strictly).
  pth = export.export_model(probe, None, "mae-finetune", str(tmp_path / "lp_official.pth"),
                            in_chans_out=in_chans_out)
  ref.load_state_dict(torch.load(pth["weights"], weights_only=True)["model"], strict=True)
  np.testing.assert_allclose(_torch_logits(ref, images, in_chans_out), ours, atol=1e-4, rtol=0)
  with open(pth["extras_json"]) as f:
    info = json.load(f)
  assert info["official_mae"]["evaluate"].startswith("python main_linprobe.py --eval --resume")
  assert info["official_mae"]["evaluate"].endswith("--cls_token")
  assert info["model"]["head"]["kind"] == "linear_probe" and info["model"]["global_pool"] == "token"


def test_avg_pool_probe_matches_timm(tmp_path):
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=48, depth=2, num_heads=4)
  # MAE main_linprobe.py --global_pool: mean of the patch tokens (no final norm) -> fc_norm ->
  # BatchNorm (no affine) -> Linear.
  probe = heads.from_pretrained(_mae(spec, seed=7), 3, kind="linear_probe", global_pool="avg")
  _perturb(probe, seed=7, scale=0.1)
  _set_bn_stats(probe, seed=7)
  paths = export.export_model(probe, None, "timm", str(tmp_path / "avg.safetensors"))
  ref, cfg = _torch_probe(paths, 48)
  assert cfg["kwargs"]["global_pool"] == "avg" and cfg["kwargs"]["fc_norm"] is True
  assert "norm.weight" not in safetensors.numpy.load_file(paths["weights"])
  images = np.random.default_rng(7).uniform(size=(3, 32, 32, 1)).astype(np.float32)
  np.testing.assert_allclose(_torch_logits(ref, images), np.asarray(probe(jnp.asarray(images))),
                             atol=1e-4, rtol=0)


def test_head_models_export_errors(tmp_path):
  spec = vit.ViTSpec(image_size=16, patch_size=8, in_chans=1, width=16, depth=1, num_heads=2)
  probe = heads.from_pretrained(_mae(spec), 2, kind="linear_probe", global_pool="avg")
  with pytest.raises(ValueError, match="mae-full.*linear probe"):
    export.export_model(probe, None, "mae-full", str(tmp_path / "x.pth"))
  probe.fc_norm = None  # timm cannot average without a norm the way MAE does
  with pytest.raises(ValueError, match="fc_norm"):
    export.export_model(probe, None, "timm", str(tmp_path / "x.safetensors"))
  affine = heads.from_pretrained(_mae(spec), 2, kind="linear_probe")
  affine.bn = nnx.BatchNorm(16, epsilon=1e-6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="affine"):
    export.export_model(affine, None, "timm", str(tmp_path / "x.safetensors"))
  assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------- extras


def _smoke_config(**overrides):
  return config_files.load("mae", "smoke", overrides)


def test_d2mae_blur_token_extras(tmp_path):
  config = _smoke_config(**{"recipe": "d2mae", "model.blur_embed": "token", "corrupt.blur": "gaussian",
                            "corrupt.sigma_levels": "0.1:1.1:0.1", "data.mean": 0.25, "data.std": 0.2})
  model = _perturb(models.build_pretrain_model(config.model, seed=0))
  paths = export.export_model(model, config, "mae-finetune", str(tmp_path / "d2.pth"))
  ckpt = torch.load(paths["weights"], weights_only=True)["model"]
  assert not any("blur" in k for k in ckpt)
  arrays = safetensors.numpy.load_file(paths["extras_arrays"])
  np.testing.assert_array_equal(arrays["blur_token"], np.asarray(model.blur_token[...]))
  t = jnp.arange(1, 12)
  np.testing.assert_allclose(arrays["blur_embedding_table"], np.asarray(model.blur_embedding(t)),
                             atol=1e-6)
  with open(paths["extras_json"]) as f:
    info = json.load(f)
  assert info["blur_token"]["variant"] == "token"
  np.testing.assert_allclose(info["blur_token"]["sigma_levels"], np.arange(1, 12) / 10)
  assert info["transfer_corruption"]["method"] == "gaussian"
  assert info["normalisation"]["mean"] == 0.25 and info["normalisation"]["std"] == 0.2
  # The documented sinusoid, written out independently of the model code.
  d = model.spec.width
  half = d // 2
  w = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
  emb3 = np.concatenate([np.sin(3 * w), np.cos(3 * w)]) + arrays["blur_token"][0]
  np.testing.assert_allclose(arrays["blur_embedding_table"][2], emb3, atol=1e-5)


def test_deblur_transfer_setting_recorded(tmp_path):
  config = _smoke_config(**{"recipe": "deblur", "corrupt.blur": "gaussian", "corrupt.sigma": 1.1})
  model = models.build_pretrain_model(config.model, seed=0)
  paths = export.export_model(model, config, "timm", str(tmp_path / "db.safetensors"))
  with open(paths["extras_json"]) as f:
    info = json.load(f)
  assert info["recipe"] == "deblur"
  assert info["transfer_corruption"]["params"] == {"sigma": 1.1, "kernel_size": 9}
  assert "extras_arrays" not in paths


def test_in_memory_errors(tmp_path):
  spec = vit.ViTSpec(image_size=16, patch_size=8, in_chans=3, width=16, depth=1, num_heads=2)
  simmim = mae_lib.SimMIM(spec, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mae-full"):
    export.export_model(simmim, None, "mae-full", str(tmp_path / "x.pth"))
  with pytest.raises(ValueError, match="only a 1-channel model"):
    export.export_model(simmim, None, "timm", str(tmp_path / "x.safetensors"), in_chans_out=1)
  with pytest.raises(ValueError, match="format="):
    export.export_model(simmim, None, "onnx", str(tmp_path / "x.onnx"))
  assert not os.listdir(tmp_path)


# -------------------------------------------------------------------------------------------- CLI


def _write_run(workdir, config, steps=(3,)):
  """A workdir as training leaves it: config.json + orbax checkpoints of the train state.
  Returns the model saved at each step."""
  core.save_config(config, str(workdir))
  mngr = checkpoint.checkpoint_manager(str(workdir), keep=5, async_save=False)
  saved = {}
  for i, step in enumerate(steps):
    model = _perturb(models.build_pretrain_model(config.model, seed=config.seed), seed=10 + i)
    _, params, _ = core.split_model(model)
    checkpoint.save_checkpoint(mngr, step, core.init_state(params, optax.sgd(0.1), 0), None, force=True)
    saved[step] = model
  mngr.wait_until_finished()
  mngr.close()
  return saved


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("mae_run")
  saved = _write_run(wd, _smoke_config(), steps=(3, 6))
  with open(wd / "data_stats.json", "w") as f:
    json.dump({"mean": 0.3, "std": 0.15}, f)
  return wd, saved


def test_cli_exports_latest_and_chosen_step(mae_run, tmp_path, capsys):
  wd, saved = mae_run
  out = str(tmp_path / "enc.safetensors")
  paths = export.main([f"--workdir={wd}", "--format=timm", f"--out={out}"])
  printed = capsys.readouterr().out
  assert "timm.create_model" in printed and '"model_name"' in printed
  got = safetensors.numpy.load_file(out)
  want = export.encoder_state_dict(saved[6].encoder)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  with open(paths["extras_json"]) as f:
    info = json.load(f)
  assert info["source"]["step"] == 6
  assert info["normalisation"] == {**info["normalisation"], "mean": 0.3, "std": 0.15,
                                   "source": "data_stats.json"}
  _load_timm(paths)  # strict load of what the CLI wrote

  full = str(tmp_path / "full.pth")
  export.main([f"--workdir={wd}", "--step=3", "--format=mae-full", f"--out={full}"])
  sd = torch.load(full, weights_only=True)["model"]
  want = export.mae_state_dict(saved[3])
  for k in want:
    np.testing.assert_array_equal(sd[k].numpy(), want[k])


def test_cli_refuses_existing_output_unless_overwrite(mae_run, tmp_path):
  wd, _ = mae_run
  out = tmp_path / "ft.pth"
  out.write_bytes(b"keep me")
  with pytest.raises(SystemExit, match="ft.pth.*exists"):
    export.main([f"--workdir={wd}", "--format=mae-finetune", f"--out={out}"])
  assert out.read_bytes() == b"keep me"
  export.main([f"--workdir={wd}", "--format=mae-finetune", f"--out={out}", "--overwrite"])
  assert "cls_token" in torch.load(out, weights_only=True)["model"]


def test_cli_errors_name_the_workdir(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(SystemExit, match="empty"):
    export.main([f"--workdir={empty}", "--format=timm", f"--out={tmp_path / 'a.safetensors'}"])
  core.save_config(_smoke_config(), str(empty))  # a config but no checkpoint yet
  with pytest.raises(SystemExit, match="no checkpoints in .*empty"):
    export.main([f"--workdir={empty}", "--format=timm", f"--out={tmp_path / 'a.safetensors'}"])
  with pytest.raises(SystemExit, match="does not exist"):
    export.main([f"--workdir={tmp_path / 'nope'}", "--format=timm", f"--out={tmp_path / 'a.st'}"])
  assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_cli_simmim_run(tmp_path):
  wd = tmp_path / "usfm"
  config = _smoke_config(**{"recipe": "usfm", "model.path": "simmim"})
  saved = _write_run(wd, config)
  with pytest.raises(SystemExit, match="mae-full.*simmim"):
    export.main([f"--workdir={wd}", "--format=mae-full", f"--out={tmp_path / 'f.pth'}"])
  paths = export.main([f"--workdir={wd}", "--format=timm", f"--out={tmp_path / 'u.safetensors'}",
                       "--in_chans=3"])
  arrays = safetensors.numpy.load_file(paths["extras_arrays"])
  np.testing.assert_array_equal(arrays["decoder_pred.weight"],
                                np.asarray(saved[3].decoder_pred.kernel[...]).T)
  _load_timm(paths)


def test_cli_as_module(mae_run, tmp_path):
  wd, _ = mae_run
  out = tmp_path / "m.pth"
  res = subprocess.run([sys.executable, "-m", "mae_jax.export", f"--workdir={wd}",
                        "--format=mae-finetune", f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert out.exists() and (tmp_path / "m.extras.json").exists()
  assert "official_mae" in json.loads((tmp_path / "m.extras.json").read_text())


# ------------------------------------------------------------------------- downstream workdirs


@pytest.fixture(scope="module")
def probe_run(mae_run, tmp_path_factory):
  """A real smoke linear probe (`finetune.run`, as `python -m mae_jax.main` runs it) on the fake
  pretraining workdir: two epochs, so the best checkpoint and the BatchNorm statistics are real."""
  from mae_jax.train import finetune
  pre, _ = mae_run
  wd = tmp_path_factory.mktemp("probe_run")
  c = load_config("linear_probe", f"smoke,init_from={pre}")
  c.train.total_steps = 16  # 8 steps per epoch on the smoke data
  c.eval.n_boot = 20
  finetune.run(c, str(wd))
  return wd


def _test_images(workdir):
  """The test split as the run's evaluation saw it: normalised, in record order."""
  from mae_jax.data import pipeline, sources
  config = core.load_config(str(workdir))
  with open(os.path.join(workdir, "data_stats.json")) as f:
    stats = json.load(f)
  src = sources.open_source(config.data, "test", task="classify")
  imgs = []
  for b in pipeline.eval_iterator(src, batch_size=64, image_size=32, in_chans=1, with_mask=False):
    imgs.append(np.asarray(b["image"])[np.asarray(b["valid"]).astype(bool)])
  x01 = np.concatenate(imgs).astype(np.float32) / 255.0
  return (x01 - stats["mean"]) / stats["std"]


def test_cli_linear_probe_run_reproduces_its_test_predictions(probe_run, mae_run, tmp_path, capsys):
  paths = export.main([f"--workdir={probe_run}", "--format=timm", f"--out={tmp_path / 'lp.safetensors'}"])
  printed = capsys.readouterr().out
  assert "torch.nn.BatchNorm1d(32, affine=False, eps=1e-06)" in printed
  ref, cfg = _torch_probe(paths, 32)
  assert cfg["kwargs"]["global_pool"] == "token" and cfg["kwargs"]["num_classes"] == 3
  with open(probe_run / "results.json") as f:
    results = json.load(f)
  with open(paths["extras_json"]) as f:
    info = json.load(f)
  # The best-validation checkpoint (the one the run tested), on the step-6 pretrained encoder.
  assert info["source"]["checkpoint"] == "best"
  assert info["source"]["step"] == results["validation_best"]["step"]
  assert info["source"]["pretrain_step"] == 6 and info["downstream"]["classes"] == results["classes"]
  with open(probe_run / "data_stats.json") as f:
    used = json.load(f)
  assert (info["normalisation"]["mean"], info["normalisation"]["std"]) == (used["mean"], used["std"])
  var = safetensors.numpy.load_file(paths["weights"])["head.0.running_var"]
  assert np.abs(var - 1).max() > 0.05  # trained statistics, not the initial ones

  # The run's own evaluation wrote the JAX probe's test probabilities; logits match them up to the
  # per-image constant softmax removes.
  images = _test_images(probe_run)
  pred = np.load(probe_run / "predictions_test.npz")
  # Records are stored in index order, so sorting by index puts the predictions in record order.
  probs = pred["probs"][np.argsort(pred["index"], kind="stable")]
  assert probs.shape == (len(images), 3)
  theirs = torch.log_softmax(torch.from_numpy(_torch_logits(ref, images)), -1).numpy()
  np.testing.assert_allclose(theirs, np.log(probs), atol=1e-4, rtol=0)

  pth = export.main([f"--workdir={probe_run}", "--format=mae-finetune", f"--out={tmp_path / 'lp_rgb.pth'}",
                     "--in_chans=3"])
  rgb = timm.create_model(cfg["model_name"], pretrained=False, **{**cfg["kwargs"], "in_chans": 3})
  rgb.head = torch.nn.Sequential(torch.nn.BatchNorm1d(32, affine=False, eps=1e-6), rgb.head)
  rgb.load_state_dict(torch.load(pth["weights"], weights_only=True)["model"], strict=True)
  theirs = torch.log_softmax(torch.from_numpy(_torch_logits(rgb.eval(), images, 3)), -1).numpy()
  np.testing.assert_allclose(theirs, np.log(probs), atol=1e-4, rtol=0)


def _rewrite_config(config, workdir):
  """Edits a workdir's config.json in place (a run never does: core.save_config refuses)."""
  workdir.mkdir(exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def test_cli_linear_probe_errors_before_restoring(probe_run, tmp_path):
  def fails(workdir, *args, match, fmt="timm"):
    with pytest.raises(SystemExit, match=match):
      export.main([f"--workdir={workdir}", f"--format={fmt}", f"--out={tmp_path / 'x.pth'}", *args])

  fails(probe_run, fmt="mae-full", match="mae-full.*linear_probe run.*timm")
  fails(probe_run, "--step=999", match=r"--step=999.*best/checkpoints holds \[\d+\]")
  config = core.load_config(str(probe_run))
  moved = tmp_path / "moved"
  config.init_from = str(tmp_path / "gone")
  _rewrite_config(config, moved)
  fails(moved, match="config.init_from=.*gone")
  config.init_from = str(probe_run.parent)  # a folder, but no pretraining workdir
  _rewrite_config(config, moved)
  fails(moved, match="config.init_from of .*moved.*no config.json")
  config.init_from = core.load_config(str(probe_run)).init_from
  _rewrite_config(config, moved)
  fails(moved, match="no best checkpoint in .*moved")  # a probe that never finished an epoch
  config.job = "segment"
  _rewrite_config(config, moved)
  fails(moved, match="job='segment'")
  assert sorted(os.listdir(tmp_path)) == ["moved"]


def _write_finetune_run(workdir, pre, global_pool, step=40):
  """A fine-tuning workdir as `finetune.run` leaves it: config.json and the best parameters."""
  config = load_config("finetune", f"smoke,init_from={pre},pool={global_pool}")
  core.save_config(config, str(workdir))
  _, pmodel, _ = core.load_pretrained(str(pre))
  clf = heads.from_pretrained(pmodel, 3, kind="finetune", global_pool=global_pool)
  _perturb(clf, seed=8, scale=0.1)
  params = nnx.to_pure_dict(nnx.state(clf, nnx.Param))
  mngr = checkpoint.checkpoint_manager(str(workdir), keep=1, async_save=False, subdir="best/checkpoints")
  checkpoint.save_checkpoint(mngr, step, {"params": params}, {"step": step}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return clf


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_cli_finetune_run(mae_run, tmp_path, global_pool):
  pre, _ = mae_run
  clf = _write_finetune_run(tmp_path / "ft", pre, global_pool)
  paths = export.main([f"--workdir={tmp_path / 'ft'}", "--format=timm",
                       f"--out={tmp_path / 'ft.safetensors'}"])
  ref, cfg = _load_timm(paths)
  assert cfg["kwargs"]["global_pool"] == global_pool
  images = np.random.default_rng(8).uniform(size=(3, 32, 32, 1)).astype(np.float32)
  np.testing.assert_allclose(_torch_logits(ref, images), np.asarray(clf(jnp.asarray(images))),
                             atol=1e-4, rtol=0)
