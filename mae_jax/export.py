"""Flax -> PyTorch state dicts in the naming of timm's VisionTransformer and facebookresearch/mae.

Layout rules: a Dense kernel [in, out] becomes a torch Linear weight [out, in]; the patch embedding
kernel, a matrix over patches flattened as (row, col, channel), becomes the conv weight [D, C, p, p].

  python -m mae_jax.export --workdir=DIR [--step=N] --format={timm,mae-finetune,mae-full} \
      --out=PATH [--in_chans=3] [--overwrite]

DIR is a pretraining workdir (the encoder) or a fine-tuning / linear-probe workdir (the classifier:
its encoder comes from the pretraining workdir the run names in `init_from`, its head from the run).
`export_model` does the same on an in-memory model. File layout and recipe extras: docs/export.md.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import flags
from flax import nnx

from mae_jax import tool_flags
from mae_jax.models import beit
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit
from mae_jax.export_formats import (  # noqa: F401  (the public names stay importable from here)
    ENCODERS,
    FORMATS,
    HEAD_KINDS,
    _encoder_of,
    _linear,
    _model_kind,
    _np,
    beit_encoder_state_dict,
    check_format,
    classifier_state_dict,
    encoder_state_dict,
    global_pool_of,
    mae_state_dict,
    official_eval_command,
    official_mae_args,
    patch_kernel_to_conv,
    probe_head_spec,
    timm_config,
    timm_usage,
)

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
      blocks = vit.block_list(model.decoder_blocks)
      decoder = (int(model.decoder_embed.kernel.shape[1]), len(blocks),
                 blocks[0].attn.num_heads if blocks else 0)
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


PROG = "python -m mae_jax.export"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags): --workdir is also main's
_WORKDIR = flags.DEFINE_string("workdir", None, "A pretraining, finetune or linear_probe workdir.",
                               flag_values=FLAGS, required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest; a finetune / "
                             "linear_probe run: its best-validation checkpoint).", flag_values=FLAGS)
_FORMAT = flags.DEFINE_enum("format", None, FORMATS, "Export format (docs/export.md).", flag_values=FLAGS,
                            required=True)
_OUT = flags.DEFINE_string("out", None, "Weights file; extras are written beside it.", flag_values=FLAGS,
                           required=True)
_IN_CHANS = flags.DEFINE_integer("in_chans", None, "Export a 1-channel model with this many input "
                                 "channels (e.g. 3).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.", flag_values=FLAGS)


def main(argv: list[str]) -> dict[str, str]:
  """The command line in-process: `argv` are the flags (no program name); the written paths by role."""
  tool_flags.parse(FLAGS, argv, PROG)
  return _export()


def _export() -> dict[str, str]:
  try:
    paths = export_workdir(_WORKDIR.value, _FORMAT.value, _OUT.value, step=_STEP.value,
                           in_chans_out=_IN_CHANS.value, overwrite=_OVERWRITE.value)
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
  tool_flags.run(FLAGS, _export)
