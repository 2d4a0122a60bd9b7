"""Flax -> PyTorch state dicts in the naming of timm's VisionTransformer and facebookresearch/mae.

Layout rules: a Dense kernel [in, out] becomes a torch Linear weight [out, in]; the patch embedding
kernel, a matrix over patches flattened as (row, col, channel), becomes the conv weight [D, C, p, p].

  python -m mae_jax.export --workdir=DIR [--step=N] --format={timm,mae-finetune,mae-full} \
      --out=PATH [--in-chans=3] [--overwrite]

DIR is a pretraining workdir (the encoder) or a fine-tuning / linear-probe workdir (the classifier:
its encoder comes from the pretraining workdir the run names in `init_from`, its head from the run).
`export_model` does the same on an in-memory model. File layout and recipe extras: docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from mae_jax.models import beit
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit

ENCODERS = (vit.Encoder, beit.Encoder)


def _np(x):
  return np.asarray(x[...] if isinstance(x, nnx.Variable) else x, dtype=np.float32)


def _linear(prefix: str, dense) -> dict[str, np.ndarray]:
  return {f"{prefix}.weight": _np(dense.kernel).T.copy(), f"{prefix}.bias": _np(dense.bias).copy()}


def _norm(prefix: str, norm) -> dict[str, np.ndarray]:
  return {f"{prefix}.weight": _np(norm.scale).copy(), f"{prefix}.bias": _np(norm.bias).copy()}


def _block(prefix: str, blk) -> dict[str, np.ndarray]:
  out = {}
  out.update(_norm(f"{prefix}.norm1", blk.norm1))
  out.update(_linear(f"{prefix}.attn.qkv", blk.attn.qkv))
  out.update(_linear(f"{prefix}.attn.proj", blk.attn.proj))
  out.update(_norm(f"{prefix}.norm2", blk.norm2))
  out.update(_linear(f"{prefix}.mlp.fc1", blk.mlp.fc1))
  out.update(_linear(f"{prefix}.mlp.fc2", blk.mlp.fc2))
  return out


def patch_kernel_to_conv(kernel: np.ndarray, patch_size: int, in_chans: int) -> np.ndarray:
  d = kernel.shape[1]
  k = kernel.reshape(patch_size, patch_size, in_chans, d)
  return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def encoder_state_dict(encoder, *, in_chans_out: int | None = None) -> dict[str, np.ndarray]:
  """timm `VisionTransformer` keys (cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*).

  `in_chans_out=3` exports a 1-channel model as 3-channel: the kernel is repeated and divided by 3,
  so a gray image repeated over RGB gives the same embedding.
  """
  if isinstance(encoder, beit.Encoder):
    return beit_encoder_state_dict(encoder, in_chans_out=in_chans_out)
  conv = _patch_conv(encoder, in_chans_out)
  sd = {
      "cls_token": _np(encoder.cls_token).copy(),
      "pos_embed": _np(encoder.pos_embed).copy(),
      "patch_embed.proj.weight": conv,
      "patch_embed.proj.bias": _np(encoder.patch_embed.proj.bias).copy(),
  }
  for i, blk in enumerate(encoder.blocks):
    sd.update(_block(f"blocks.{i}", blk))
  sd.update(_norm("norm", encoder.norm))
  return sd


def beit_encoder_state_dict(encoder, *, in_chans_out: int | None = None) -> dict[str, np.ndarray]:
  """timm `Beit` / USFM backbone keys of a `beit.Encoder`: cls_token, patch_embed.proj.*, a shared
  `rel_pos_bias.relative_position_bias_table` or per-block `attn.relative_position_bias_table`,
  `attn.qkv.weight` (no bias) with `attn.q_bias` / `attn.v_bias`, `gamma_1` / `gamma_2`, norm.*.
  The index buffers are not written (timm rebuilds them; USFM's loader drops them)."""
  sd = {"cls_token": _np(encoder.cls_token).copy(),
        "patch_embed.proj.weight": _patch_conv(encoder, in_chans_out),
        "patch_embed.proj.bias": _np(encoder.patch_embed.proj.bias).copy()}
  if encoder.rel_pos_bias is not None:
    sd["rel_pos_bias.relative_position_bias_table"] = _np(encoder.rel_pos_bias).copy()
  for i, blk in enumerate(encoder.blocks):
    p = f"blocks.{i}"
    sd.update(_norm(f"{p}.norm1", blk.norm1))
    sd[f"{p}.attn.qkv.weight"] = _np(blk.attn.qkv.kernel).T.copy()
    if blk.attn.q_bias is not None:
      sd[f"{p}.attn.q_bias"] = _np(blk.attn.q_bias).copy()
      sd[f"{p}.attn.v_bias"] = _np(blk.attn.v_bias).copy()
    if blk.attn.relative_position_bias_table is not None:
      sd[f"{p}.attn.relative_position_bias_table"] = _np(blk.attn.relative_position_bias_table).copy()
    sd.update(_linear(f"{p}.attn.proj", blk.attn.proj))
    sd.update(_norm(f"{p}.norm2", blk.norm2))
    sd.update(_linear(f"{p}.mlp.fc1", blk.mlp.fc1))
    sd.update(_linear(f"{p}.mlp.fc2", blk.mlp.fc2))
    if blk.gamma_1 is not None:
      sd[f"{p}.gamma_1"] = _np(blk.gamma_1).copy()
      sd[f"{p}.gamma_2"] = _np(blk.gamma_2).copy()
  if encoder.norm is not None:
    sd.update(_norm("norm", encoder.norm))
  return sd


def _patch_conv(encoder, in_chans_out):
  spec = encoder.spec
  conv = patch_kernel_to_conv(_np(encoder.patch_embed.proj.kernel), spec.patch_size, spec.in_chans)
  if in_chans_out is not None and in_chans_out != spec.in_chans:
    if spec.in_chans != 1:
      raise ValueError(f"only a 1-channel model can be exported as {in_chans_out}-channel")
    conv = np.repeat(conv, in_chans_out, axis=1) / in_chans_out
  return conv


def mae_state_dict(model, *, in_chans_out: int | None = None) -> dict[str, np.ndarray]:
  """The full `MaskedAutoencoderViT` state dict of facebookresearch/mae (encoder + decoder)."""
  if not hasattr(model, "decoder_blocks"):
    raise ValueError("the full MAE export needs the MAE path (transformer decoder); this model is "
                     "SimMIM-style (USFM). Export its encoder with format 'timm' instead.")
  if in_chans_out is not None and in_chans_out != model.spec.in_chans:
    raise ValueError("a full MAE export keeps the model's channel count (its decoder predicts them)")
  sd = encoder_state_dict(model.encoder)
  sd.update(_linear("decoder_embed", model.decoder_embed))
  sd["mask_token"] = _np(model.mask_token).copy()
  sd["decoder_pos_embed"] = _np(model.decoder_pos_embed).copy()
  for i, blk in enumerate(model.decoder_blocks):
    sd.update(_block(f"decoder_blocks.{i}", blk))
  sd.update(_norm("decoder_norm", model.decoder_norm))
  sd.update(_linear("decoder_pred", model.decoder_pred))
  return sd


def _batchnorm(prefix: str, bn, num_batches_tracked: int) -> dict[str, np.ndarray]:
  if getattr(bn, "scale", None) is not None or getattr(bn, "bias", None) is not None:
    raise ValueError("the linear-probe BatchNorm has affine parameters; MAE's probe head "
                     "(BatchNorm1d(affine=False) + Linear) has none, so it cannot be written as one")
  # torch's strict load wants the counter too; with momentum set it never enters the arithmetic.
  return {f"{prefix}.running_mean": _np(bn.mean).copy(), f"{prefix}.running_var": _np(bn.var).copy(),
          f"{prefix}.num_batches_tracked": np.asarray(num_batches_tracked, np.int64)}


def classifier_state_dict(clf, *, in_chans_out: int | None = None,
                          num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """A classifier (`.encoder`, `.head`, pooled as `global_pool` says) in timm's keys.

  global_pool='avg': timm drops the final `norm` and normalises the pooled patch tokens with
  `fc_norm`, so `norm.*` is left out (a strict load would reject it) and `fc_norm.*` is added.
  global_pool='token': `norm.*` stays and there is no `fc_norm`. A linear probe's head is MAE's
  `main_linprobe.py` Sequential(BatchNorm1d(affine=False), Linear): keys `head.0.running_mean`,
  `head.0.running_var`, `head.0.num_batches_tracked`, `head.1.weight`, `head.1.bias`.
  """
  kind = _model_kind(clf)
  if kind not in HEAD_KINDS:
    raise ValueError(f"classifier_state_dict needs a classifier or a linear probe, not a {kind}")
  sd = encoder_state_dict(clf.encoder, in_chans_out=in_chans_out)
  if global_pool_of(clf) == "avg":
    for k in ("norm.weight", "norm.bias"):
      sd.pop(k)
    sd.update(_norm("fc_norm", clf.fc_norm))
  if kind == "linear_probe":
    sd.update(_batchnorm("head.0", clf.bn, num_batches_tracked))
    sd.update(_linear("head.1", clf.head))
  else:
    sd.update(_linear("head", clf.head))
  return sd


# ------------------------------------------------------------------------------------ model kinds

FORMATS = ("timm", "mae-finetune", "mae-full")

# timm's registered names for the standard sizes: (width, depth, heads, patch) -> name.
_TIMM_NAMES = {
    (192, 12, 3, 16): "vit_tiny_patch16_224",
    (384, 12, 6, 16): "vit_small_patch16_224",
    (768, 12, 12, 16): "vit_base_patch16_224",
    (1024, 24, 16, 16): "vit_large_patch16_224",
    (1280, 32, 16, 14): "vit_huge_patch14_224",
}
# Any registered ViT works as a carrier when every architecture argument is given explicitly
# (timm merges the call's kwargs over the name's defaults).
_TIMM_GENERIC = "vit_base_patch16_224"


HEAD_KINDS = ("classifier", "linear_probe")


def _model_kind(model) -> str:
  if isinstance(model, ENCODERS):
    return "encoder"
  if hasattr(model, "head"):
    if not hasattr(model, "encoder"):
      raise ValueError("a classifier export needs `.encoder` and `.head`; this model has a head but "
                       "no encoder")
    global_pool_of(model)  # raises on a pooling timm cannot reproduce
    return "linear_probe" if hasattr(model, "bn") else "classifier"
  if hasattr(model, "decoder_blocks"):
    return "mae"
  if hasattr(model, "encoder") and hasattr(model, "decoder_pred"):
    return "simmim"
  raise ValueError(f"cannot export a {type(model).__name__}: expected an MAE, a SimMIM model, a "
                   "vit.Encoder, a classifier (.encoder/.fc_norm/.head) or a linear probe "
                   "(.encoder/.bn/.head)")


def global_pool_of(model) -> str:
  """How a head model pools: its `global_pool` if it says, else what its class always does
  (`heads.LinearProbe`: the CLS token after the final norm; a classifier: MAE's average pool)."""
  pool = getattr(model, "global_pool", None)
  if pool is None:
    pool = "token" if hasattr(model, "bn") else "avg"
  if pool not in ("avg", "token"):
    raise ValueError(f"global_pool={pool!r}: expected 'avg' or 'token'")
  if pool == "avg" and getattr(model, "fc_norm", None) is None:
    # timm's avg pooling without fc_norm applies the final norm before pooling; nothing here trains
    # such a model, and exporting it as MAE's fc_norm variant would silently change the logits.
    raise ValueError("a global_pool='avg' classifier or probe needs `.fc_norm` (MAE: mean of the "
                     "patch tokens without the final norm -> fc_norm -> head)")
  return pool


def probe_head_spec(model) -> dict[str, Any]:
  """How a PyTorch user rebuilds a linear probe's head (MAE `main_linprobe.py`) before loading."""
  d, k = (int(n) for n in np.shape(model.head.kernel[...]))
  eps = float(model.bn.epsilon)
  return {
      "kind": "linear_probe",
      "modules": [{"type": "BatchNorm1d", "num_features": d, "affine": False, "eps": eps},
                  {"type": "Linear", "in_features": d, "out_features": k}],
      "code": f"model.head = torch.nn.Sequential(torch.nn.BatchNorm1d({d}, affine=False, "
              f"eps={eps!r}), model.head)",
      "note": "replace timm's Linear head with this before load_state_dict; call model.eval() so "
              "the BatchNorm uses the exported running statistics",
  }


def _encoder_of(model):
  return model if isinstance(model, ENCODERS) else model.encoder


def check_format(fmt: str, kind: str, *, in_chans: int, in_chans_out: int | None) -> None:
  """Raises ValueError when `fmt` cannot be produced from a model of this kind."""
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
  if fmt == "mae-full" and kind != "mae":
    what = {"simmim": "a SimMIM-path model (USFM: linear decoder, no transformer decoder)",
            "classifier": "a fine-tuned classifier", "linear_probe": "a linear probe",
            "encoder": "a bare encoder"}[kind]
    raise ValueError(f"format 'mae-full' needs the MAE path (transformer decoder); cannot produce it "
                     f"from {what}. Use format 'timm' or 'mae-finetune' for the encoder.")
  if in_chans_out is not None and in_chans_out != in_chans:
    if fmt == "mae-full":
      raise ValueError("in_chans: a 'mae-full' export keeps the model's channel count (its decoder "
                       f"predicts {in_chans} channel(s)); drop --in-chans")
    if in_chans != 1:
      raise ValueError(f"in_chans={in_chans_out}: only a 1-channel model can change its channel "
                       f"count on export (this one has {in_chans})")


def timm_config(spec: vit.ViTSpec, *, in_chans: int | None = None, num_classes: int = 0,
                global_pool: str = "token", encoder=None) -> dict[str, Any]:
  """{'model_name', 'kwargs'} for `timm.create_model(model_name, pretrained=False, **kwargs)`.

  Every architecture argument is explicit, so a non-standard size loads through any ViT name. A
  `beit.Encoder` gives timm's `Beit` (USFM's backbone) instead.
  """
  if isinstance(encoder, beit.Encoder):
    shared = encoder.rel_pos_bias is not None
    return {"model_name": "beit_base_patch16_224", "kwargs": dict(
        img_size=spec.image_size, patch_size=spec.patch_size,
        in_chans=spec.in_chans if in_chans is None else in_chans, embed_dim=spec.width,
        depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=float(spec.mlp_ratio),
        qkv_bias=encoder.options.qkv_bias, init_values=encoder.options.init_values or None,
        use_abs_pos_emb=False, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared,
        global_pool=global_pool, use_fc_norm=global_pool == "avg", num_classes=num_classes)}
  name = _TIMM_NAMES.get((spec.width, spec.depth, spec.num_heads, spec.patch_size))
  kwargs = dict(
      img_size=spec.image_size, patch_size=spec.patch_size,
      in_chans=spec.in_chans if in_chans is None else in_chans, embed_dim=spec.width,
      depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=float(spec.mlp_ratio), qkv_bias=True,
      class_token=True, no_embed_class=False, pre_norm=False, global_pool=global_pool,
      fc_norm=global_pool == "avg", num_classes=num_classes)
  return {"model_name": name or _TIMM_GENERIC, "kwargs": kwargs}


# facebookresearch/mae's model names (models_vit.py / models_mae.py) for the standard sizes.
_OFFICIAL_NAMES = {
    (768, 12, 12, 16): "vit_base_patch16",
    (1024, 24, 16, 16): "vit_large_patch16",
    (1280, 32, 16, 14): "vit_huge_patch14",
}


def official_mae_args(spec: vit.ViTSpec, fmt: str, *, in_chans: int,
                      decoder: tuple[int, int, int] | None = None) -> dict[str, Any]:
  """How facebookresearch/mae's scripts pick this architecture (None where it has no such model).

  decoder: (width, depth, heads) of a 'mae-full' export; the official presets are 512 x 8 x 16.
  """
  name = _OFFICIAL_NAMES.get((spec.width, spec.depth, spec.num_heads, spec.patch_size))
  if fmt == "mae-full" and name is not None:
    name = "mae_" + name + "_dec512d8b" if decoder == (512, 8, 16) else None
  out: dict[str, Any] = {"model": name, "input_size": spec.image_size, "in_chans": in_chans}
  notes = []
  if name is None:
    notes.append("no official model of this size: build it with models_vit.VisionTransformer / "
                 "models_mae.MaskedAutoencoderViT and these dimensions")
  if in_chans != 3:
    notes.append(f"the official scripts build 3-channel models: pass in_chans={in_chans} to the "
                 "model constructor, or export with --in-chans=3")
  if notes:
    out["notes"] = notes
  return out


def official_eval_command(model, kind: str, weights: str) -> str:
  """The facebookresearch/mae command that evaluates an exported classifier / probe as it is: its
  `--resume` loads {'model': ...} strictly into the script's model (a probe's with the BN head)."""
  spec = _encoder_of(model).spec
  name = _OFFICIAL_NAMES.get((spec.width, spec.depth, spec.num_heads, spec.patch_size), "MODEL")
  k = int(np.shape(model.head.kernel[...])[1])
  pool = global_pool_of(model)
  if kind == "linear_probe":  # main_linprobe.py pools the CLS token unless told --global_pool
    flag = " --global_pool" if pool == "avg" else " --cls_token"
    script = "main_linprobe.py"
  else:  # main_finetune.py pools globally unless told --cls_token
    flag = " --cls_token" if pool == "token" else " --global_pool"
    script = "main_finetune.py"
  # main_linprobe.py has no --input_size: it always crops 224 px.
  size = f" --input_size {spec.image_size}" if kind == "classifier" else ""
  return f"python {script} --eval --resume {weights} --model {name} --nb_classes {k}{size}{flag}"


def timm_usage(cfg: dict, weights: str) -> str:
  kw = ", ".join(f"{k}={v!r}" for k, v in cfg["kwargs"].items())
  lines = ["import timm, torch, safetensors.torch" if "head" in cfg else "import timm, safetensors.torch",
           f"model = timm.create_model({cfg['model_name']!r}, pretrained=False, {kw})"]
  if "head" in cfg:
    lines.append(cfg["head"]["code"])
  lines.append(f"model.load_state_dict(safetensors.torch.load_file({weights!r}), strict=True)")
  if "head" in cfg:
    lines.append("model.eval()")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------- output paths

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def output_paths(fmt: str, out: str, *, with_arrays: bool, with_extras: bool = True) -> dict[str, str]:
  """Where an export writes: the weights at `out`; beside it, named from its stem (`out` less a
  .safetensors/.pth/.pt suffix), `STEM.timm.json`, `STEM.extras.json`, `STEM.extras.safetensors`."""
  stem = out
  for suf in _WEIGHT_SUFFIXES:
    if out.endswith(suf):
      stem = out[: -len(suf)]
      break
  paths = {"weights": out}
  if fmt == "timm":
    paths["timm_json"] = stem + ".timm.json"
  if with_extras:
    paths["extras_json"] = stem + ".extras.json"
  if with_arrays:
    paths["extras_arrays"] = stem + ".extras.safetensors"
  return paths


def _check_free(paths: dict[str, str], overwrite: bool) -> None:
  if overwrite:
    return
  for p in paths.values():
    if os.path.exists(p):
      raise ValueError(f"output path {p!r} exists; pass overwrite=True (--overwrite) to replace it")


# ---------------------------------------------------------------------------------- recipe extras


def _get(cfg, dotted: str, default=None):
  node = cfg
  for part in dotted.split("."):
    if node is None:
      return default
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      node = getattr(node, part, None)
      if node is None:
        return default
  return node


def _plain(x):
  if hasattr(x, "to_dict"):
    return _plain(x.to_dict())
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x


def parse_sigma_levels(text: str) -> list[float] | None:
  """D²MAE's "start:stop:step" (stop included) -> [σ_1, ..., σ_T]; "" -> None."""
  if not text:
    return None
  try:
    start, stop, step = (float(v) for v in str(text).split(":"))
  except ValueError:
    raise ValueError(f"corrupt.sigma_levels={text!r}: expected 'start:stop:step'") from None
  if step <= 0 or stop < start:
    raise ValueError(f"corrupt.sigma_levels={text!r}: expected start <= stop and step > 0")
  n = int(math.floor((stop - start) / step + 1e-6)) + 1
  return [round(start + i * step, 10) for i in range(n)]


def transfer_corruption(config) -> dict[str, Any]:
  """The blur that fine-tuning, probing and evaluation must apply (docs/methods.md#deblurring-mae and docs/methods.md#d2mae): the pretraining blur,
  as `mae_jax.corrupt.blur.apply_blur(method, key, images, **params)` takes it."""
  where = ("on [0, 1] intensities at model resolution, before normalisation, to train, validation "
           "and test images alike")
  corrupt = _get(config, "corrupt")
  if corrupt is None:
    return {"method": "none", "note": "no corruption recorded in the config"}
  levels = parse_sigma_levels(_get(corrupt, "sigma_levels", ""))
  method = _get(corrupt, "blur", "none")
  if levels is not None:
    from mae_jax.corrupt import blur as blur_lib
    return {"method": "gaussian", "sigma_levels": levels, "t": list(range(1, len(levels) + 1)),
            "kernel_size": blur_lib.gaussian_kernel_size(max(levels)),
            "params": "per image: sigma = sigma_levels[t* - 1], t* from the optimal blurriness search "
                      "(D²MAE Algorithm 1) run with this checkpoint; the encoder also gets BLU(t*)",
            "where": where}
  if method == "none":
    return {"method": "none"}
  if method == "gaussian":
    from mae_jax.corrupt import blur as blur_lib
    sigma = float(_get(corrupt, "sigma"))
    params = {"sigma": sigma, "kernel_size": blur_lib.gaussian_kernel_size(sigma)}
  elif method == "srad":
    params = {"iterations": int(_get(corrupt, "srad_iters")), "dt": float(_get(corrupt, "srad_dt"))}
  elif method in ("mean", "median"):
    params = {"size": int(_get(corrupt, "kernel"))}
  elif method == "motion":
    params = {"length": int(_get(corrupt, "kernel"))}  # direction drawn per sample
  elif method == "defocus":
    params = {"radius": int(_get(corrupt, "defocus_radius"))}
  else:
    params = {}
  return {"method": method, "params": params, "where": where}


def _normalisation(config, data_stats) -> dict[str, Any]:
  mean, std = _get(config, "data.mean"), _get(config, "data.std")
  if mean is not None and std is not None:
    source = "config.data"
  elif isinstance(data_stats, dict) and "mean" in data_stats and "std" in data_stats:
    mean, std, source = data_stats["mean"], data_stats["std"], "data_stats.json"
  else:
    return {"mean": None, "std": None,
            "note": "not recorded: the run measured them on its training split (see its logs)"}
  return {"mean": _plain(mean), "std": _plain(std), "source": source,
          "formula": "(x - mean) / std on [0, 1] intensities, after the corruption; a 1-channel "
                     "model exported as 3-channel uses the same value on every channel"}


def blur_token_arrays(model, levels: list[float] | None) -> dict[str, np.ndarray]:
  """D²MAE: the learnable vector and, when the levels are known, the whole table BLU(t), t = 1..T."""
  out = {"blur_token": _np(model.blur_token).copy()}
  if levels:
    t = np.arange(1, len(levels) + 1, dtype=np.float32)
    out["blur_embedding_table"] = np.asarray(
        mae_lib.timestep_embedding(t, _encoder_of(model).spec.width), np.float32) + out["blur_token"]
  return out


def recipe_extras(model, config, *, fmt: str, in_chans_out: int | None = None,
                  data_stats: dict | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(JSON record, arrays) of what the weights alone do not carry: recipe, transfer blur,
  normalisation, the D²MAE blurriness token, the SimMIM pixel head."""
  kind = _model_kind(model)
  spec = _encoder_of(model).spec
  info: dict[str, Any] = {
      "format": fmt,
      "recipe": _get(config, "recipe"),
      "model": {"kind": kind, "path": _get(config, "model.path"), "variant": _get(config, "model.variant"),
                "image_size": spec.image_size, "patch_size": spec.patch_size,
                "in_chans": spec.in_chans,
                "in_chans_exported": spec.in_chans if in_chans_out is None else in_chans_out,
                "width": spec.width, "depth": spec.depth, "num_heads": spec.num_heads},
      "normalisation": _normalisation(config, data_stats),
      "transfer_corruption": transfer_corruption(config),
  }
  if kind in HEAD_KINDS:
    info["model"]["global_pool"] = global_pool_of(model)
    info["model"]["num_classes"] = int(np.shape(model.head.kernel[...])[1])
  if kind == "linear_probe":
    info["model"]["head"] = probe_head_spec(model)
  if _get(config, "corrupt") is not None:
    info["corrupt_config"] = _plain(_get(config, "corrupt"))
  arrays: dict[str, np.ndarray] = {}
  blur_embed = getattr(model, "blur_embed", "none")
  if blur_embed != "none":
    levels = parse_sigma_levels(_get(config, "corrupt.sigma_levels", ""))
    arrays.update(blur_token_arrays(model, levels))
    placement = {
        "token": "sequence [CLS, BLU(t), patch tokens]; BLU gets a zero position row (like CLS), "
                 "passes through the blocks and the decoder like CLS, and is dropped before the "
                 "pixel prediction",
        "add": "BLU(t) is added to every patch token after its position embedding",
    }[blur_embed]
    info["blur_token"] = {
        "variant": blur_embed,
        "arrays": {"blur_token": "learnable vector, shape (1, D)",
                   "blur_embedding_table": "BLU(t) for t = 1..T, shape (T, D), row t-1"
                                           if levels else "absent: sigma levels not in the config"},
        "definition": "BLU(t) = timestep_embedding(t, D) + blur_token",
        "timestep_embedding": "DDPM sinusoid: half = D // 2, w_k = exp(-ln(10000) * k / (half - 1)) "
                              "for k = 0..half-1, emb(t) = concat(sin(t * w), cos(t * w)), "
                              "zero-padded to D when D is odd",
        "t": "1-based blur level index: sigma_t = sigma_levels[t - 1]",
        "sigma_levels": levels,
        "placement": placement,
        "in_weights": "not in the exported state dict: timm and the official MAE have no such token",
    }
  if fmt == "mae-full" and blur_embed != "none":
    info["warning"] = ("the official MaskedAutoencoderViT has no blurriness token: it loads {weights} "
                       "but reconstructs without BLU(t); add blur_token as described under blur_token "
                       "in {extras}")
  if kind in HEAD_KINDS and blur_embed != "none":
    info["warning"] = ("this classifier was trained with the D²MAE blurriness token, which timm and "
                       "the official MAE lack: they load {weights} but compute different logits "
                       "unless BLU(t*) is inserted as described under blur_token in {extras}")
  if kind == "simmim":
    arrays.update(_linear("decoder_pred", model.decoder_pred))
    info["simmim"] = {
        "arrays": {"decoder_pred.weight": "(p*p*C, D) torch Linear weight", "decoder_pred.bias": "(p*p*C,)"},
        "definition": "pixels of each patch token = decoder_pred(encoder tokens[:, 1:]), in MAE patch "
                      "order, then unpatchify",
        "mask_token": "none: the USFM path fills masked units with the image mean instead of a "
                      "learnable token",
    }
  return info, arrays


# ------------------------------------------------------------------------------------ export API


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("the 'mae-finetune' and 'mae-full' formats write a PyTorch .pth and need torch "
                      "(pip install torch); the 'timm' format needs only safetensors") from e
  return torch


def state_dict_for(model, fmt: str, *, in_chans_out: int | None = None,
                   num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """The exported tensors of `model` in `fmt` (no files, no checks beyond the format's)."""
  kind = _model_kind(model)
  check_format(fmt, kind, in_chans=_encoder_of(model).spec.in_chans, in_chans_out=in_chans_out)
  if fmt != "timm" and isinstance(_encoder_of(model), beit.Encoder):
    raise ValueError(f"format {fmt!r} is facebookresearch/mae's ViT; this model has the BEiT backbone "
                     "(USFM's): use format 'timm' (timm's Beit, the key names USFM's code loads)")
  if fmt == "mae-full":
    return mae_state_dict(model)
  if kind in HEAD_KINDS:
    return classifier_state_dict(model, in_chans_out=in_chans_out,
                                 num_batches_tracked=num_batches_tracked)
  return encoder_state_dict(_encoder_of(model), in_chans_out=in_chans_out)


def export_model(model, config, fmt: str, out: str, *, in_chans_out: int | None = None,
                 overwrite: bool = False, extras: dict | None = None) -> dict[str, str]:
  """Writes `model` in `fmt` to `out` and its recipe extras beside it; returns {role: path}.

  fmt: 'timm' (safetensors + `STEM.timm.json` with the `timm.create_model` arguments),
  'mae-finetune' (`.pth` {'model': encoder state dict} for facebookresearch/mae `main_finetune.py
  --finetune`), 'mae-full' (`.pth` {'model': MaskedAutoencoderViT state dict}, decoder included).
  config: the run's ConfigDict (recipe, corruption, data stats) or None. extras: more JSON-able
  entries for `STEM.extras.json`; a `data_stats` dict with mean/std there fills the normalisation
  when the config has none. Nothing is written unless every output path is free (or overwrite).
  """
  extras = dict(extras or {})
  kind = _model_kind(model)
  spec = _encoder_of(model).spec
  # A probe's BatchNorm was updated once per training step: the step is the honest counter.
  source_step = (extras.get("source") or {}).get("step") if isinstance(extras.get("source"), dict) else None
  sd = state_dict_for(model, fmt, in_chans_out=in_chans_out, num_batches_tracked=int(source_step or 0))
  info, arrays = recipe_extras(model, config, fmt=fmt, in_chans_out=in_chans_out,
                               data_stats=extras.get("data_stats"))
  info.update(_plain(extras))
  paths = output_paths(fmt, out, with_arrays=bool(arrays))
  _check_free(paths, overwrite)
  if "warning" in info:  # printed on its own by the CLI: it names the files it is about
    info["warning"] = info["warning"].format(weights=os.path.basename(paths["weights"]),
                                             extras=os.path.basename(paths["extras_json"]))

  timm_cfg = None
  if fmt in ("timm", "mae-finetune"):
    if kind in HEAD_KINDS:
      pool = global_pool_of(model)
      timm_cfg = timm_config(spec, in_chans=in_chans_out,
                             num_classes=int(np.shape(model.head.kernel[...])[1]), global_pool=pool,
                             encoder=_encoder_of(model))
      if kind == "linear_probe":
        timm_cfg["head"] = probe_head_spec(model)
    else:
      timm_cfg = timm_config(spec, in_chans=in_chans_out, encoder=_encoder_of(model))
    info["timm"] = timm_cfg
  if fmt != "timm":
    decoder = None
    if fmt == "mae-full":
      blk = model.decoder_blocks[0] if len(model.decoder_blocks) else None
      decoder = (int(model.decoder_embed.kernel.shape[1]), len(model.decoder_blocks),
                 blk.attn.num_heads if blk is not None else 0)
    info["official_mae"] = official_mae_args(spec, fmt, in_chans=in_chans_out or spec.in_chans,
                                             decoder=decoder)
    if kind in HEAD_KINDS:
      info["official_mae"]["evaluate"] = official_eval_command(model, kind, paths["weights"])
  info["weights"] = os.path.basename(paths["weights"])
  if "extras_arrays" in paths:
    info["extras_arrays"] = os.path.basename(paths["extras_arrays"])

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  if fmt == "timm":
    safetensors.numpy.save_file(sd, paths["weights"], metadata={
        "format": "timm", "timm_model_name": timm_cfg["model_name"],
        "timm_kwargs": json.dumps(timm_cfg["kwargs"], sort_keys=True)})
    with open(paths["timm_json"], "w") as f:
      json.dump(timm_cfg, f, indent=2)
  else:
    torch = _torch()
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}},
               paths["weights"])
  if arrays:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                                paths["extras_arrays"])
  with open(paths["extras_json"], "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  for p in paths.values():  # readable by everyone whatever the umask (and torch.save's temp file)
    os.chmod(p, 0o644)
  return paths


# ------------------------------------------------------------------------------ checkpoint -> file


def _read_data_stats(workdir: str) -> dict | None:
  return _read_json(os.path.join(workdir, "data_stats.json"))


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from None


DOWNSTREAM_JOBS = ("finetune", "linear_probe")


def export_workdir(workdir: str, fmt: str, out: str, *, step: int | None = None,
                   in_chans_out: int | None = None, overwrite: bool = False) -> dict[str, str]:
  """The CLI's work: checks what it can before restoring, then `export_model` on the checkpoint.

  A pretraining workdir exports its encoder (or the whole MAE); a 'finetune' / 'linear_probe'
  workdir exports its classifier (`export_downstream_workdir`)."""
  from mae_jax.train import checkpoint, core
  workdir = os.path.abspath(os.path.expanduser(workdir))  # orbax takes absolute paths only
  if not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} does not exist")
  config = core.load_config(workdir)
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
  job = _get(config, "job") or "pretrain"
  if job in DOWNSTREAM_JOBS:
    return export_downstream_workdir(workdir, fmt, out, step=step, in_chans_out=in_chans_out,
                                     overwrite=overwrite, config=config)
  if job != "pretrain":
    raise ValueError(f"workdir {workdir!r} holds a job={job!r} run (config.json): only pretraining, "
                     f"{' and '.join(repr(j) for j in DOWNSTREAM_JOBS)} workdirs hold a model to "
                     "export; export the pretraining workdir it started from (its config.init_from)")
  path = _get(config, "model.path")
  if fmt == "mae-full" and path != "mae":
    raise ValueError(f"format 'mae-full' needs the MAE path; {workdir!r} holds a model.path={path!r} "
                     "(SimMIM/USFM: linear decoder) run. Use format 'timm' or 'mae-finetune'.")
  in_chans = int(_get(config, "model.in_chans"))
  check_format(fmt, "mae" if path == "mae" else "simmim", in_chans=in_chans, in_chans_out=in_chans_out)
  # Fail on an occupied output before the (possibly long) restore.
  _check_free(output_paths(fmt, out, with_arrays=False), overwrite)
  config, model, step = core.load_pretrained(workdir, step)
  extras = {"source": {"workdir": os.path.abspath(workdir), "step": int(step)}}
  stats = _read_data_stats(workdir)
  if stats is not None:
    extras["data_stats"] = stats
  return export_model(model, config, fmt, out, in_chans_out=in_chans_out, overwrite=overwrite,
                      extras=extras)


def _downstream_checkpoint(workdir: str, job: str, step: int | None) -> tuple[str, int, str]:
  """(checkpoint folder, step, 'best' | 'latest'). By default the best-validation checkpoint: the
  model whose test metrics the run reports in results.json."""
  from mae_jax import validate
  best_root, latest_root = os.path.join(workdir, "best"), workdir
  best, latest = validate.checkpoint_steps(best_root), validate.checkpoint_steps(latest_root)
  best_dir = os.path.join(best_root, "checkpoints")
  if step is None:
    if best:
      return best_dir, best[-1], "best"
    hint = (f"; pass --step with one of the steps in {os.path.join(workdir, 'checkpoints')}: "
            f"{latest}" if latest else "")
    raise ValueError(f"no best checkpoint in {best_dir}: the {job} run in {workdir!r} has not "
                     f"finished an epoch{hint}")
  if step in best:
    return best_dir, step, "best"
  if step in latest:
    return os.path.join(workdir, "checkpoints"), step, "latest"
  raise ValueError(f"--step={step}: no such checkpoint in {workdir!r} (best/checkpoints holds "
                   f"{best or 'none'}, checkpoints/ holds {latest or 'none'})")


def _restore_downstream(ckpt_dir: str, step: int) -> tuple[dict, dict]:
  """(params, stats) of a fine-tuning / probe checkpoint, as host numpy: the trained parameters
  (all of a fine-tuned classifier; only `head` of a probe) and the BatchNorm statistics."""
  import orbax.checkpoint as ocp
  from mae_jax.train import checkpoint, core
  with_stats = os.path.isdir(os.path.join(ckpt_dir, str(step), "stats"))
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "stats", "data"))
  items = {"state": ocp.args.StandardRestore()}
  if with_stats:
    items["stats"] = ocp.args.StandardRestore()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  finally:
    mngr.close()
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  to_host = lambda tree: checkpoint._int_keys(jax.tree.map(np.asarray, tree))  # noqa: E731
  return to_host(params), (to_host(restored["stats"]) if with_stats else {})


def export_downstream_workdir(workdir: str, fmt: str, out: str, *, step: int | None = None,
                              in_chans_out: int | None = None, overwrite: bool = False,
                              config=None) -> dict[str, str]:
  """Exports the classifier of a 'finetune' or 'linear_probe' workdir (default: its best-validation
  checkpoint). The encoder of a probe is frozen and not in its checkpoints: it is read from the
  pretraining workdir `config.init_from` at the step the run used."""
  from mae_jax.models import heads
  from mae_jax.train import checkpoint, core
  workdir = os.path.abspath(os.path.expanduser(workdir))  # orbax takes absolute paths only
  if config is None:
    if not os.path.isdir(workdir):
      raise ValueError(f"workdir {workdir!r} does not exist")
    config = core.load_config(workdir)
  job = _get(config, "job")
  if job not in DOWNSTREAM_JOBS:
    raise ValueError(f"workdir {workdir!r} holds a job={job!r} run, not one of {DOWNSTREAM_JOBS}")
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
  init_from = _get(config, "init_from") or ""
  if fmt == "mae-full":
    raise ValueError(f"format 'mae-full' is a pretraining model with its decoder; {workdir!r} holds "
                     f"a {job} run (a classifier, no decoder). Use format 'timm' or 'mae-finetune' "
                     f"for the classifier, or export the pretraining workdir {init_from!r} as "
                     "'mae-full'.")
  init_from = os.path.abspath(os.path.expanduser(init_from)) if init_from else ""
  if not init_from or not os.path.isdir(init_from):
    raise ValueError(f"{workdir!r} is a {job} run of config.init_from={init_from!r}, which is not a "
                     "directory: the pretrained encoder (and the recipe) of the run live there; "
                     "restore that workdir, or edit init_from in the run's config.json")
  try:
    pcfg = core.load_config(init_from)
  except ValueError as e:
    raise ValueError(f"config.init_from of {workdir!r}: {e}") from None
  kind = "linear_probe" if job == "linear_probe" else "classifier"
  check_format(fmt, kind, in_chans=int(_get(pcfg, "model.in_chans")), in_chans_out=in_chans_out)
  ckpt_dir, step, which = _downstream_checkpoint(workdir, job, step)
  results = _read_json(os.path.join(workdir, "results.json")) or {}
  # The pretraining step the run started from: pinned in the config, else recorded in results.json;
  # "latest" is only right while the pretraining workdir has not moved on since.
  pstep = _get(config, "init_step")
  if pstep is None:
    pstep = results.get("checkpoint_step")
  from mae_jax import validate
  available = validate.checkpoint_steps(init_from)
  if not available or (pstep is not None and int(pstep) not in available):
    raise ValueError(f"{workdir!r} was trained on the encoder of config.init_from={init_from!r} at "
                     f"step {'(latest)' if pstep is None else pstep}, but that workdir holds "
                     f"checkpoints {available or 'none'}: the frozen/initial encoder is gone")
  _check_free(output_paths(fmt, out, with_arrays=False), overwrite)

  try:
    pcfg, pmodel, pstep = core.load_pretrained(init_from, None if pstep is None else int(pstep))
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"config.init_from={init_from!r} (the encoder of {workdir!r}): {e}") from None
  params, stats = _restore_downstream(ckpt_dir, step)
  try:
    num_classes = int(np.shape(params["head"]["kernel"])[-1])
  except (KeyError, TypeError):
    raise ValueError(f"{ckpt_dir}/{step} holds no head parameters: is {workdir!r} a "
                     f"{job} workdir?") from None
  model = heads.from_pretrained(pmodel, num_classes, kind=job,
                                global_pool=_get(config, "model.global_pool"),
                                seed=int(_get(config, "seed") or 0))
  del pmodel
  for kind_filter, tree, what in ((nnx.Param, params, "parameters"), (nnx.BatchStat, stats, "statistics")):
    if not tree:
      continue
    state = nnx.state(model, kind_filter)
    try:
      nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
    except (KeyError, ValueError) as e:
      raise ValueError(f"the {what} in {ckpt_dir}/{step} do not fit a {job} model on the encoder "
                       f"of {init_from!r}: {e}") from None
    nnx.update(model, state)

  extras: dict[str, Any] = {
      "source": {"workdir": os.path.abspath(workdir), "step": int(step), "checkpoint": which,
                 "job": job, "pretrain_workdir": init_from, "pretrain_step": int(pstep)},
  }
  # The reported scores belong to the best checkpoint only.
  keys = ("classes", "transfer", "obs") + (("test", "validation_best") if which == "best" else ())
  down = {k: results[k] for k in keys if k in results}
  if down:
    extras["downstream"] = down
  used = _read_data_stats(workdir)  # what the run normalised with (its config may override)
  if used is not None and "mean" in used and "std" in used:
    extras["data_stats"] = used
    extras["normalisation"] = {
        "mean": used["mean"], "std": used["std"], "source": f"{job} run's data_stats.json",
        "formula": "(x - mean) / std on [0, 1] intensities, after the corruption; a 1-channel "
                   "model exported as 3-channel uses the same value on every channel"}
  elif (init_stats := _read_data_stats(init_from)) is not None:
    extras["data_stats"] = init_stats
  return export_model(model, pcfg, fmt, out, in_chans_out=in_chans_out, overwrite=overwrite,
                      extras=extras)


def main(argv: list[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.export",
      description="Export a mae_jax pretraining checkpoint (encoder / MAE) or a fine-tuning / "
                  "linear-probe run (classifier) to timm / facebookresearch-MAE PyTorch weights "
                  "(see docs/export.md).")
  parser.add_argument("--workdir", required=True,
                      help="a pretraining, finetune or linear_probe workdir (config.json, checkpoints/)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the latest; a finetune / linear_probe run: "
                           "its best-validation checkpoint)")
  parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
  parser.add_argument("--out", required=True, help="weights file; extras are written beside it")
  parser.add_argument("--in-chans", type=int, default=None, dest="in_chans",
                      help="export a 1-channel model with this many input channels (e.g. 3)")
  parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
  args = parser.parse_args(argv)
  try:
    paths = export_workdir(args.workdir, args.fmt, args.out, step=args.step,
                           in_chans_out=args.in_chans, overwrite=args.overwrite)
  except (ValueError, ImportError) as e:
    raise SystemExit(f"mae_jax.export: error: {e}") from None
  for role, p in paths.items():
    print(f"{role}: {p}")
  with open(paths["extras_json"]) as f:
    info = json.load(f)
  if info.get("warning"):
    print(f"warning: {info['warning']}")
  if (info.get("official_mae") or {}).get("evaluate"):
    print(f"facebookresearch/mae: {info['official_mae']['evaluate']}")
  if "timm_json" in paths:
    with open(paths["timm_json"]) as f:
      cfg = json.load(f)
    print("timm.create_model arguments:")
    print(json.dumps(cfg, indent=2))
    print(timm_usage(cfg, paths["weights"]))
  return paths


if __name__ == "__main__":
  main()
