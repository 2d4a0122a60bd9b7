"""Released PyTorch checkpoints -> a pretraining workdir that every downstream job reads with
`init_from=` (config.json + data_stats.json + checkpoints/0).

  python -m mae_jax.import_weights --checkpoint=USFM_latest.pth --workdir=runs/usfm_released
  python -m mae_jax.import_weights --checkpoint=mae_pretrain_vit_base.pth --workdir=runs/mae_b
  python -m mae_jax.import_weights --checkpoint=mae_visualize_vit_large.pth --workdir=runs/mae_l \
      --image_size=256 --in_chans=1

Layouts (found from the key names; the state dict may sit under 'model', 'state_dict' or 'module',
its keys may carry a 'module.', 'backbone.' or 'encoder.' prefix):
  * BEiT (USFM's backbone `usdsgen/modules/backbone/vision_transformer.py`, and timm's `Beit`):
    `blocks.N.attn.q_bias / v_bias`, `blocks.N.attn.relative_position_bias_table` or a shared
    `rel_pos_bias.relative_position_bias_table` (a file with both is refused), `blocks.N.gamma_1 /
    gamma_2`, no `pos_embed`.
    Becomes recipe 'usfm' (SimMIM path, `model.backbone='beit'`); the linear pixel decoder was not
    released, so `decoder_pred` keeps its initialisation (downstream jobs never read it).
  * MAE (facebookresearch/mae `mae_pretrain_vit_*.pth`: the encoder in timm's ViT names; the
    `mae_visualize_vit_*.pth` checkpoints add `decoder_*` and `mask_token`): recipe 'mae'. Without a
    decoder in the file the decoder keeps its initialisation.
  Buffers (`relative_position_index`) and classifier heads (`head.*`, `fc_norm.*`) are skipped.

Channels: a 3-channel patch embedding becomes a 1-channel one (`--in_chans=1`, ultrasound) by folding
the per-channel normalisation into it: for a gray image x repeated over RGB and normalised per channel
(m_c, s_c), Σ_c W_c·(x − m_c)/s_c + b = W'·(x − m)/s + b' with W' = s·Σ_c W_c/s_c and
b' = b − Σ W_c·m_c/s_c + Σ W'·m/s (sums over the patch and channels), m/s the 1-channel statistics
written to data_stats.json (by default the means of m_c and s_c). With equal channel statistics this is
the kernel summed over channels. The log says which was done.

Image size: relative position tables are resampled as timm's `resize_rel_pos_bias_table`
(`beit.resize_relative_table`); MAE's fixed 2-D sin-cos table is rebuilt for the new grid by the model
(what the checkpoint holds is that table, checked), and a learned one is resampled bicubically
as timm's `resample_abs_pos_embed` — our MAE encoder keeps a fixed table in pretraining, so that case
is refused with a message instead.

Reading `.pth` files needs torch (`pip install torch`).
"""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
from absl import flags

from mae_jax import tool_flags
from mae_jax.models import beit
from mae_jax.models import vit

log = logging.getLogger("mae_jax")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFIXES = ("module.", "backbone.", "encoder.", "model.")


# -------------------------------------------------------------------------------- reading


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.pth` (torch) or `.safetensors` file as {name: float32 numpy}, unwrapped and unprefixed."""
  if not os.path.exists(path):
    raise ValueError(f"--checkpoint={path!r} does not exist")
  if path.endswith(".safetensors"):
    import safetensors.numpy
    return normalise_keys(safetensors.numpy.load_file(path))
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading a .pth checkpoint needs torch (pip install torch)") from e
  obj = torch.load(path, map_location="cpu", weights_only=False)
  return normalise_keys(obj)


def normalise_keys(obj) -> dict[str, np.ndarray]:
  for key in ("model", "state_dict", "module"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  sd = {}
  for k, v in obj.items():
    if not hasattr(v, "shape"):
      continue
    sd[k] = v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32)
  changed = True
  while changed:  # strip wrappers ('module.backbone.blocks...') while every key has them
    changed = False
    for p in PREFIXES:
      if sd and all(k.startswith(p) for k in sd):
        sd = {k[len(p):]: v for k, v in sd.items()}
        changed = True
  return sd


def layout_of(sd: dict) -> str:
  """'beit' or 'mae' from the key names."""
  if "patch_embed.proj.weight" in sd and any(
      k.endswith(("q_bias", "relative_position_bias_table", "gamma_1")) for k in sd):
    return "beit"
  if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd and "cls_token" in sd:
    return "mae"
  raise ValueError("the checkpoint holds neither a BEiT/USFM backbone nor an MAE/timm ViT "
                   "(no 'patch_embed.proj.weight' / 'blocks.0.attn.qkv.weight')")


def _depth(sd, prefix="blocks") -> int:
  idx = [int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
  return max(idx) + 1 if idx else 0


# ---------------------------------------------------------------------------- architecture


def architecture(sd: dict, *, num_heads: int | None = None) -> dict:
  """width, depth, heads, patch, in_chans and image size that the tensors imply."""
  kind = layout_of(sd)
  w = sd["patch_embed.proj.weight"]
  width, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
  depth = _depth(sd)
  if kind == "beit":
    key = ("rel_pos_bias.relative_position_bias_table" if "rel_pos_bias.relative_position_bias_table" in sd
           else "blocks.0.attn.relative_position_bias_table")
    n, heads = sd[key].shape
    side = int(round((np.sqrt(n - 3) + 1) / 2))
    if (2 * side - 1) ** 2 + 3 != n:
      raise ValueError(f"{key} has {n} rows: not the table of a square patch grid")
    heads = int(heads)
  else:
    side = int(round(np.sqrt(sd["pos_embed"].shape[1] - 1)))
    heads = num_heads or _preset_heads(width, depth)
  return {"layout": kind, "width": width, "depth": depth, "heads": heads, "patch": patch,
          "in_chans": in_chans, "image_size": side * patch}


def _preset_heads(width, depth) -> int:
  for w, d, h, _ in vit.PRESETS.values():
    if (w, d) == (width, depth):
      return h
  raise ValueError(f"no preset of width {width} and depth {depth}: pass --num_heads")


def preset_name(arch: dict) -> str:
  for name, (w, d, h, _) in vit.PRESETS.items():
    if (w, d, h) == (arch["width"], arch["depth"], arch["heads"]):
      return name
  raise ValueError(f"width {arch['width']}, depth {arch['depth']}, {arch['heads']} heads is none of "
                   f"the model sizes {sorted(vit.PRESETS)}")


# ------------------------------------------------------------------------------ key mapping


def conv_to_patch_kernel(w: np.ndarray) -> np.ndarray:
  """torch conv weight (D, C, p, p) -> our (p·p·C, D) kernel over patches flattened (row, col, channel)."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)).reshape(-1, w.shape[0]))


def fold_channels(w: np.ndarray, b: np.ndarray, *, in_chans: int, src_mean, src_std, mean: float,
                  std: float) -> tuple[np.ndarray, np.ndarray, str]:
  """The conv weight (D, C, p, p) and bias for `in_chans` input channels (see the module docstring)."""
  c = w.shape[1]
  if c == in_chans:
    return w, b, f"patch embedding kept at {c} channels"
  if in_chans != 1:
    raise ValueError(f"--in_chans={in_chans}: a {c}-channel checkpoint imports as {c} or 1 channel(s)")
  m = np.asarray(src_mean, np.float64).reshape(1, c, 1, 1)
  s = np.asarray(src_std, np.float64).reshape(1, c, 1, 1)
  w64 = w.astype(np.float64)
  w1 = std * np.sum(w64 / s, axis=1, keepdims=True)
  b1 = b.astype(np.float64) - np.sum(w64 * m / s, axis=(1, 2, 3)) + np.sum(w1 * mean / std, axis=(1, 2, 3))
  equal = np.allclose(m, m.flat[0]) and np.allclose(s, s.flat[0]) and np.isclose(std, s.flat[0])
  how = ("kernel summed over the channels" if equal else
         f"kernel summed over the channels after folding the per-channel normalisation "
         f"(mean {[float(v) for v in np.ravel(m)]}, std {[float(v) for v in np.ravel(s)]}) into it, for 1-channel data "
         f"normalised with mean {mean:g}, std {std:g}")
  return w1.astype(np.float32), b1.astype(np.float32), f"{c}-channel patch embedding -> 1 channel: {how}"


def _lin(sd, prefix, bias=True):
  out = {"kernel": sd[f"{prefix}.weight"].T.copy()}
  if bias:
    out["bias"] = sd[f"{prefix}.bias"].copy()
  return out


def _ln(sd, prefix):
  return {"scale": sd[f"{prefix}.weight"].copy(), "bias": sd[f"{prefix}.bias"].copy()}


def _mlp(sd, prefix):
  return {"fc1": _lin(sd, f"{prefix}.fc1"), "fc2": _lin(sd, f"{prefix}.fc2")}


def _patch_embed(sd, conv_w, conv_b):
  del sd
  return {"proj": {"kernel": conv_to_patch_kernel(conv_w), "bias": conv_b.copy()}}


def beit_encoder_params(sd: dict, *, conv_w, conv_b, grid_in, grid_out, shared: bool) -> dict:
  """Our `beit.Encoder` pure dict from BEiT/USFM names. `shared`: the target keeps one table (a
  pretraining encoder); per-block tables in the file are then refused. The final `norm` (absent
  when the model pools through fc_norm) stays at its init when the file has none."""
  depth = _depth(sd)
  out = {"patch_embed": _patch_embed(sd, conv_w, conv_b), "cls_token": sd["cls_token"].copy(),
         "blocks": {}}
  shared_key = "rel_pos_bias.relative_position_bias_table"
  resize = lambda t: beit.resize_relative_table(t, grid_in, grid_out)  # noqa: E731
  if shared:
    if shared_key not in sd:
      raise ValueError("the checkpoint has one relative position table per block; import it with "
                       "shared_rel_pos=False")
    # A file with both kinds would train on the shared table alone: its per-block tables would be lost.
    per_block = [k for k in sd if k.startswith("blocks.") and k.endswith(".attn.relative_position_bias_table")]
    if per_block:
      raise ValueError(f"the checkpoint has a shared relative position table ({shared_key}) and "
                       f"per-block ones ({per_block[0]}, ...): a pretraining encoder keeps one table, so "
                       "the per-block tables would be dropped; remove one kind from the state dict")
    out["rel_pos_bias"] = resize(sd[shared_key])
  for i in range(depth):
    p = f"blocks.{i}"
    attn = {"qkv": _lin(sd, f"{p}.attn.qkv", bias=False), "proj": _lin(sd, f"{p}.attn.proj")}
    if f"{p}.attn.q_bias" in sd:
      attn["q_bias"] = sd[f"{p}.attn.q_bias"].copy()
      attn["v_bias"] = sd[f"{p}.attn.v_bias"].copy()
    if not shared:
      table = sd.get(f"{p}.attn.relative_position_bias_table", sd.get(shared_key))
      if table is not None:
        attn["relative_position_bias_table"] = resize(table)
    blk = {"norm1": _ln(sd, f"{p}.norm1"), "attn": attn, "norm2": _ln(sd, f"{p}.norm2"),
           "mlp": _mlp(sd, f"{p}.mlp")}
    if f"{p}.gamma_1" in sd:
      blk["gamma_1"] = sd[f"{p}.gamma_1"].copy()
      blk["gamma_2"] = sd[f"{p}.gamma_2"].copy()
    out["blocks"][i] = blk
  if "norm.weight" in sd:
    out["norm"] = _ln(sd, "norm")
  return out


def _vit_block(sd, p):
  return {"norm1": _ln(sd, f"{p}.norm1"), "attn": {"qkv": _lin(sd, f"{p}.attn.qkv"),
                                                   "proj": _lin(sd, f"{p}.attn.proj")},
          "norm2": _ln(sd, f"{p}.norm2"), "mlp": _mlp(sd, f"{p}.mlp")}


def vit_encoder_params(sd: dict, *, conv_w, conv_b) -> dict:
  """Our `vit.Encoder` trainable parameters from timm / MAE names (the position table is not one)."""
  out = {"patch_embed": _patch_embed(sd, conv_w, conv_b), "cls_token": sd["cls_token"].copy(),
         "blocks": {i: _vit_block(sd, f"blocks.{i}") for i in range(_depth(sd))}}
  if "norm.weight" in sd:
    out["norm"] = _ln(sd, "norm")
  return out


def mae_decoder_params(sd: dict) -> dict:
  """MAE's decoder (the visualize checkpoints) in our `mae.MAE` names."""
  return {"decoder_embed": _lin(sd, "decoder_embed"), "mask_token": sd["mask_token"].copy(),
          "decoder_blocks": {i: _vit_block(sd, f"decoder_blocks.{i}")
                             for i in range(_depth(sd, "decoder_blocks"))},
          "decoder_norm": _ln(sd, "decoder_norm"), "decoder_pred": _lin(sd, "decoder_pred")}


# ------------------------------------------------------------------------------- the import


def _merge(dst: dict, src: dict, path=()) -> list[str]:
  """Writes src's leaves into dst (same nesting); returns the paths of src that dst lacks."""
  missing = []
  for k, v in src.items():
    if k not in dst:
      missing.append(".".join(map(str, path + (k,))))
    elif isinstance(v, dict):
      missing += _merge(dst[k], v, path + (k,))
    else:
      if tuple(np.shape(dst[k])) != tuple(np.shape(v)):
        raise ValueError(f"{'.'.join(map(str, path + (k,)))}: checkpoint shape {np.shape(v)} != model "
                         f"shape {np.shape(dst[k])}")
      dst[k] = np.asarray(v, np.float32)
  return missing


def _leaves(tree, path=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, path + (k,))
    else:
      yield ".".join(map(str, path + (k,)))


def import_state_dict(sd: dict, *, in_chans: int = 1, image_size: int | None = None,
                      num_heads: int | None = None, mean: float | None = None, std: float | None = None,
                      src_mean=IMAGENET_MEAN, src_std=IMAGENET_STD, norm_pix_loss: bool = False,
                      decoder_heads: int = 16, scan_layers: bool = False):
  """(pretraining config, model with the checkpoint's weights, data stats, notes) for a state dict.
  scan_layers: the model (and the workdir's checkpoint) in the scanned block layout."""
  from flax import nnx

  from mae_jax import config_files, models

  arch = architecture(sd, num_heads=num_heads)
  variant = preset_name(arch)
  image_size = int(image_size or arch["image_size"])
  if image_size % arch["patch"]:
    raise ValueError(f"--image_size={image_size} is not a multiple of the patch size {arch['patch']}")
  c = arch["in_chans"]
  src_mean = tuple(src_mean)[:c] if c > 1 else (float(np.mean(src_mean)),)
  src_std = tuple(src_std)[:c] if c > 1 else (float(np.mean(src_std)),)
  mean = float(np.mean(src_mean)) if mean is None else float(mean)
  std = float(np.mean(src_std)) if std is None else float(std)
  notes = [f"{arch['layout']} layout: width {arch['width']}, depth {arch['depth']}, {arch['heads']} "
           f"heads, patch {arch['patch']}, {c} channel(s), {arch['image_size']} px -> model.variant="
           f"{variant!r}, {image_size} px"]
  conv_w, conv_b, how = fold_channels(sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                                      in_chans=in_chans, src_mean=src_mean, src_std=src_std, mean=mean,
                                      std=std)
  notes.append(how)
  grid_in = (arch["image_size"] // arch["patch"],) * 2
  grid_out = (image_size // arch["patch"],) * 2

  if arch["layout"] == "beit":
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    overrides = {"model.backbone": "beit", "model.shared_rel_pos": shared}
    if "blocks.0.gamma_1" not in sd:
      raise ValueError("a BEiT checkpoint without layer scale (gamma_1) is not supported")
    overrides["model.layer_scale"] = 0.1  # an init value only (USFM's); the trained gammas are loaded
    config = config_files.load("usfm", "", overrides)
  else:
    config = config_files.load("mae", "", {"model.norm_pix_loss": bool(norm_pix_loss)})
    if "decoder_embed.weight" in sd:
      config.model.decoder_width = int(sd["decoder_embed.weight"].shape[0])
      config.model.decoder_depth = _depth(sd, "decoder_blocks")
      config.model.decoder_heads = int(decoder_heads)
  config.model.variant = variant
  config.model.patch_size = arch["patch"]
  config.model.image_size = image_size
  config.model.in_chans = in_chans
  config.data.mean, config.data.std = mean, std
  config.recipe = "usfm" if arch["layout"] == "beit" else "mae"
  config.train.total_steps = 0
  config.model.scan_layers = bool(scan_layers)

  model = models.build_pretrain_model(config.model, seed=0)
  state = nnx.state(model, nnx.Param)
  params = vit.unstack_blocks(nnx.to_pure_dict(state))  # checkpoints name blocks one by one
  if arch["layout"] == "beit":
    enc = beit_encoder_params(sd, conv_w=conv_w, conv_b=conv_b, grid_in=grid_in, grid_out=grid_out,
                              shared=config.model.shared_rel_pos)
    if grid_in != grid_out:
      notes.append(f"relative position tables resampled from {grid_in} to {grid_out} patches "
                   "(timm's resize_rel_pos_bias_table)")
    decoder = {}
  else:
    enc = vit_encoder_params(sd, conv_w=conv_w, conv_b=conv_b)
    pos = sd.get("pos_embed")
    if pos is not None:
      table = vit.sincos_2d(arch["width"], grid_in, num_prefix=1)[None]
      if not np.allclose(pos, table, atol=1e-4):
        raise ValueError("the checkpoint's pos_embed is not MAE's fixed 2-D sin-cos table (a fine-tuned "
                         "model?): only pretraining checkpoints import, their table is rebuilt for the grid")
      notes.append("pos_embed is MAE's fixed sin-cos table: rebuilt for the " + f"{grid_out} grid")
    decoder = mae_decoder_params(sd) if "decoder_embed.weight" in sd else {}
    if decoder and in_chans != c:
      # The decoder predicts c channels per pixel; a 1-channel model predicts one.
      del decoder["decoder_pred"]
      notes.append(f"decoder_pred predicts {c} channels: kept at initialisation for {in_chans}")
  missing = _merge(params["encoder"], enc, ("encoder",))
  missing += _merge(params, decoder)
  if missing:
    raise ValueError(f"checkpoint entries without a place in the model: {missing}")
  imported = {"encoder." + k for k in _leaves(enc)} | set(_leaves(decoder))
  left = [k for k in _leaves(params) if k not in imported]
  if left:
    notes.append(f"kept at initialisation (not in the checkpoint): {', '.join(sorted(left))}")
  nnx.replace_by_pure_dict(state, vit.match_layout(params, model))
  nnx.update(model, state)
  skipped = sorted(k for k in sd if k.startswith(("head.", "fc_norm.")) or "relative_position_index" in k)
  if skipped:
    notes.append(f"skipped (not part of the encoder): {', '.join(skipped)}")
  return config, model, {"mean": mean, "std": std}, notes


def write_workdir(workdir: str, config, model, stats: dict, *, source: str, notes) -> str:
  """A pretraining workdir: config.json, data_stats.json, checkpoints/0 with the parameters."""
  from flax import nnx

  from mae_jax.train import checkpoint, core
  workdir = os.path.abspath(workdir)
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"--workdir={workdir!r} already holds checkpoints: choose an empty folder")
  core.save_config(config, workdir)
  with open(os.path.join(workdir, "data_stats.json"), "w") as f:
    json.dump({**stats, "from": os.path.abspath(source)}, f)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mngr = checkpoint.checkpoint_manager(workdir, keep=1, async_save=False)
  checkpoint.save_checkpoint(mngr, 0, {"params": params}, {"imported_from": os.path.abspath(source),
                                                     "notes": list(notes)}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  with open(os.path.join(workdir, "import.json"), "w") as f:
    json.dump({"checkpoint": os.path.abspath(source), "notes": list(notes)}, f, indent=2)
  return workdir


PROG = "python -m mae_jax.import_weights"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags): --workdir is also main's
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, ".pth (torch) or .safetensors file.", flag_values=FLAGS,
                                  required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The pretraining workdir to create.", flag_values=FLAGS,
                               required=True)
_IN_CHANS = flags.DEFINE_integer("in_chans", 1, "Input channels of the imported model (1: ultrasound).",
                                 flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "0: the checkpoint's.", flag_values=FLAGS)
_NUM_HEADS = flags.DEFINE_integer("num_heads", 0, "MAE layouts of a non-standard size only.", flag_values=FLAGS)
_MEAN = flags.DEFINE_float("mean", None, "1-channel normalisation (data_stats.json).", flag_values=FLAGS)
_STD = flags.DEFINE_float("std", None, "1-channel normalisation (data_stats.json).", flag_values=FLAGS)
_SRC_MEAN = flags.DEFINE_list("src_mean", [str(v) for v in IMAGENET_MEAN],
                              "The checkpoint's per-channel normalisation (default ImageNet's).", flag_values=FLAGS)
_SRC_STD = flags.DEFINE_list("src_std", [str(v) for v in IMAGENET_STD], "The checkpoint's per-channel std.",
                             flag_values=FLAGS)
_NORM_PIX_LOSS = flags.DEFINE_bool("norm_pix_loss", False, "MAE decoder trained on normalised patches.",
                                   flag_values=FLAGS)
_DECODER_HEADS = flags.DEFINE_integer("decoder_heads", 16, "MAE decoder heads (the official: 16).",
                                      flag_values=FLAGS)


def main(argv: list[str]) -> str:
  """The command line in-process: `argv` are the flags (no program name); the workdir written."""
  tool_flags.parse(FLAGS, argv, PROG)
  return _import()


def _import() -> str:
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    sd = load_state_dict(_CHECKPOINT.value)
    config, model, stats, notes = import_state_dict(
        sd, in_chans=_IN_CHANS.value, image_size=_IMAGE_SIZE.value or None, num_heads=_NUM_HEADS.value or None,
        mean=_MEAN.value, std=_STD.value, src_mean=_floats("src_mean", _SRC_MEAN.value),
        src_std=_floats("src_std", _SRC_STD.value), norm_pix_loss=_NORM_PIX_LOSS.value,
        decoder_heads=_DECODER_HEADS.value)
    for n in notes:
      log.info("import: %s", n)
    wd = write_workdir(_WORKDIR.value, config, model, stats, source=_CHECKPOINT.value, notes=notes)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  log.info("wrote %s: start downstream jobs with init_from=%s", wd, wd)
  return wd


def _floats(name: str, values: list[str]) -> list[float]:
  try:
    return [float(v) for v in values]
  except ValueError:
    raise ValueError(f"--{name}={','.join(values)}: expected comma-separated numbers") from None


if __name__ == "__main__":
  tool_flags.run(FLAGS, _import)
