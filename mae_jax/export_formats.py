"""Flax models -> PyTorch state dicts in the naming of timm's VisionTransformer / Beit and
facebookresearch/mae, and what each format says about the model (timm config, official MAE
arguments). `mae_jax.export` writes them out.

Layout rules: a Dense kernel [in, out] becomes a torch Linear weight [out, in]; the patch embedding
kernel, a matrix over patches flattened as (row, col, channel), becomes the conv weight [D, C, p, p].
Blocks are read one by one whichever the model's layout (`vit.block_list`: a scanned stack is sliced).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from mae_jax.models import beit
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
  for i, blk in enumerate(vit.block_list(encoder.blocks)):
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
  for i, blk in enumerate(vit.block_list(encoder.blocks)):
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
  for i, blk in enumerate(vit.block_list(model.decoder_blocks)):
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
                       f"predicts {in_chans} channel(s)); drop --in_chans")
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
                 "model constructor, or export with --in_chans=3")
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
