"""Accelerator memory and compile time of the real pretraining step, measured without an accelerator.

For each recipe × ViT size × per-device batch × block setting, the train step of
`mae_jax.train.pretrain.make_train_step` (augmentation, corruption, model, loss, AdamW) is compiled
ahead of time on abstract inputs (`jax.jit(...).lower(ShapeDtypeStructs).compile()`: no parameters
are initialised, no data is read) and XLA's `memory_analysis()` of the compiled step is reported:
temporaries, arguments (params + optimizer state + batch), outputs, and their total less the
donated state that aliases the outputs. One device, bfloat16 compute (the accelerator default).

The compile runs on this host's backend (CPU unless an accelerator is present): XLA:CPU's buffer
assignment is not the GPU's, so the figures are an estimate of an accelerator's footprint (the
arguments and outputs are exact, the temporaries depend on fusion and scheduling).

  python -m benchmarks.memory                                     # the full grid (slow on CPU)
  python -m benchmarks.memory --recipes=mae --variants=b --batches=64 --settings=on
  python -m benchmarks.memory --micro                             # a micro model (tests)

Settings: `off` = plain per-block loop (model.scan_layers=False, model.remat=none); `on` = blocks
under nnx.scan with `--remat_on` (default full) rematerialisation.
"""

from __future__ import annotations

import json
import time

from absl import flags

from mae_jax import tool_flags

FLAGS = flags.FlagValues()  # this tool's own (tool_flags): the benchmarks share flag names
_RECIPES = flags.DEFINE_list("recipes", ["mae", "d2mae", "usfm"], "Recipes (configs/<name>.py).", flag_values=FLAGS)
_VARIANTS = flags.DEFINE_list("variants", ["b", "l"], "ViT sizes (model.variant).", flag_values=FLAGS)
_BATCHES = flags.DEFINE_list("batches", ["64", "128", "256"], "Per-device batch sizes.", flag_values=FLAGS)
_SETTINGS = flags.DEFINE_list("settings", ["off", "on"], "off: no scan, no remat; on: scan + --remat_on.",
                              flag_values=FLAGS)
_REMAT_ON = flags.DEFINE_string("remat_on", "full", "model.remat of the 'on' setting.", flag_values=FLAGS)
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "model.dtype (bfloat16 = the accelerator default).",
                             flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "model.image_size.", flag_values=FLAGS)
_BUDGET_GB = flags.DEFINE_float("budget_gb", 80.0, "Device memory the 'fits' column compares with.", flag_values=FLAGS)
_MICRO = flags.DEFINE_bool("micro", False, "A micro model at 32 px, batch 2 (smoke test of the tool).",
                           flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", "", "Also write the rows as JSON here.", flag_values=FLAGS)

GB = 1e9


def step_config(recipe: str, variant: str, batch: int, setting: str, *, dtype: str, image_size: int,
                remat_on: str):
  from mae_jax import config_files
  config = config_files.load(recipe, "smoke" if variant == "micro" else None)
  m = config.model
  m.variant, m.dtype, m.image_size = variant, dtype, image_size
  if variant != "micro":
    m.patch_size = 0
  m.scan_layers = setting == "on"
  m.remat = remat_on if setting == "on" else "none"
  config.train.batch_size = batch
  config.train.grad_accum = 1  # the whole per-device batch in one step, as on an accelerator
  return config


def measure(config) -> dict:
  """Compile time and memory_analysis() of the train step of `config` on abstract inputs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mae_jax import models
  from mae_jax.train import core, optim, pretrain

  t = config.train
  schedule = optim.warmup_cosine(t.base_lr, 10, 100, t.min_lr)
  tx = optim.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, grad_clip=t.grad_clip)
  abstract = nnx.eval_shape(lambda: models.build_pretrain_model(config.model, seed=0))
  graphdef, params, rest = core.split_model(abstract)
  state = jax.eval_shape(lambda p: core.init_state(p, tx, 0), params)
  s, c, b = config.model.image_size, config.model.in_chans, t.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, c), jnp.uint8),
           "zoom": jax.ShapeDtypeStruct((b, 2), jnp.float32)}
  step = jax.jit(pretrain.make_train_step(config, graphdef, tx, schedule, 0.2, 0.2), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, rest, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  n_params = sum(int(x.size) for x in jax.tree.leaves(params))
  out = {"params_m": n_params / 1e6, "lower_s": t1 - t0, "compile_s": t2 - t1}
  for k in ("temp", "argument", "output", "alias", "generated_code"):
    out[f"{k}_gb"] = float(getattr(mem, f"{k}_size_in_bytes", 0) or 0) / GB
  # Donated state aliases its outputs: counted once.
  out["total_gb"] = out["temp_gb"] + out["argument_gb"] + out["output_gb"] - out["alias_gb"]
  return out


def table(rows, budget_gb: float) -> str:
  head = ("| recipe | ViT | batch | setting | params (M) | compile (s) | temp (GB) | arguments (GB) | "
          "outputs (GB) | total (GB) | fits |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
  lines = [head]
  for r in rows:
    lines.append(f"| {r['recipe']} | {r['variant'].upper()} | {r['batch']} | {r['setting']} | "
                 f"{r['params_m']:.1f} | {r['lower_s'] + r['compile_s']:.1f} | {r['temp_gb']:.2f} | "
                 f"{r['argument_gb']:.2f} | {r['output_gb']:.2f} | {r['total_gb']:.2f} | "
                 f"{'yes' if r['total_gb'] <= budget_gb else 'no'} |")
  return "\n".join(lines)


def largest_fitting(rows, budget_gb: float) -> str:
  """For each recipe, size and setting: the largest measured per-device batch within the budget."""
  best = {}
  for r in rows:
    key = (r["recipe"], r["variant"], r["setting"])
    if r["total_gb"] <= budget_gb:
      best[key] = max(best.get(key, 0), r["batch"])
    else:
      best.setdefault(key, 0)
  lines = [f"| recipe | ViT | setting | largest batch ≤ {budget_gb:g} GB |", "|---|---|---|---:|"]
  for (recipe, variant, setting), b in sorted(best.items()):
    lines.append(f"| {recipe} | {variant.upper()} | {setting} | {b or 'none measured'} |")
  return "\n".join(lines)


def main(argv: list[str]) -> list[dict]:
  """The command line in-process: `argv` are the flags (no program name); the measured rows."""
  tool_flags.parse(FLAGS, argv, "python -m benchmarks.memory")
  return run()


def run() -> list[dict]:
  import jax
  if _MICRO.value:
    grid = [(r, "micro", 2, s) for r in _RECIPES.value for s in _SETTINGS.value]
    image_size = 32
  else:
    grid = [(r, v, int(b), s) for r in _RECIPES.value for v in _VARIANTS.value
            for s in _SETTINGS.value for b in _BATCHES.value]
    image_size = _IMAGE_SIZE.value
  print(f"# backend {jax.default_backend()}, {jax.devices()[0].device_kind}; dtype {_DTYPE.value}; "
        f"{image_size} px; 'on' = scan + remat={_REMAT_ON.value}", flush=True)
  rows = []
  for recipe, variant, batch, setting in grid:
    config = step_config(recipe, variant, batch, setting, dtype=_DTYPE.value, image_size=image_size,
                         remat_on=_REMAT_ON.value)
    r = {"recipe": recipe, "variant": variant, "batch": batch, "setting": setting, **measure(config)}
    rows.append(r)
    print(json.dumps(r), flush=True)
  print(table(rows, _BUDGET_GB.value))
  print()
  print(largest_fitting(rows, _BUDGET_GB.value))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  tool_flags.run(FLAGS, run)
