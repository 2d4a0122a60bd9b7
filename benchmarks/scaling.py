"""Scaling table: the MAE train step at batch 8/32/128 (ViT-S) and for ViT-Ti/S/B (batch 32), each
against the official-style PyTorch peer, one fresh process per row (`benchmarks.step`), and the
recipe overhead of D²MAE, Deblurring MAE and USFM (with its augmentation) over its model's plain
step. Prints a markdown table; `--json` keeps everything.

  python -m benchmarks.scaling                 # the full table (tens of minutes on 2 cores)
  python -m benchmarks.scaling --batches=2,4 --variants=micro --base_variant=micro --base_batch=4 \
      --recipes=mae,d2mae --steps=1 --warmup=1 --image_size=32 --patch=8 --decoder=16x1x2   # smoke (tests)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types

from absl import flags

from mae_jax import tool_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROG = "python -m benchmarks.scaling"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags): the benchmarks share flag names
flags.DEFINE_list("batches", ["8", "32", "128"], "Batch sizes of the base variant's rows.",
                             flag_values=FLAGS)
flags.DEFINE_list("variants", ["ti", "s", "b"], "Variants of the --base_batch rows.", flag_values=FLAGS)
flags.DEFINE_string("base_variant", "s", "Variant of the batch rows.", flag_values=FLAGS)
flags.DEFINE_integer("base_batch", 32, "Batch of the variant rows.", flag_values=FLAGS)
flags.DEFINE_list("recipes", ["mae", "d2mae", "deblur", "usfm", "simmim"],
                             "The overhead row's recipes (empty: no overhead row).", flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "Timed steps per side.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 1, "Untimed steps per side.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Image side (px).", flag_values=FLAGS)
flags.DEFINE_integer("patch", 0, "Patch size (0: the preset's).", flag_values=FLAGS)
flags.DEFINE_string("decoder", "256x4x8", "Decoder WIDTHxDEPTHxHEADS.", flag_values=FLAGS)
flags.DEFINE_string("peers", "official", "benchmarks.step --peers (empty: JAX only).", flag_values=FLAGS)
flags.DEFINE_integer("timeout", 3600, "Seconds per row.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the results here.", flag_values=FLAGS)


def rows(args):
  """(label, extra benchmarks.step arguments) of each row."""
  out = []
  for b in args.batches:
    out.append((f"ViT-{args.base_variant.upper()} batch {b}", [f"--variant={args.base_variant}", f"--batch={b}"]))
  for v in args.variants:
    if v == args.base_variant and args.base_batch in args.batches:
      continue  # already a row
    out.append((f"ViT-{v.upper()} batch {args.base_batch}", [f"--variant={v}", f"--batch={args.base_batch}"]))
  return out


def run_step(step_args, timeout: int) -> dict:
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "step.json")
    cmd = [sys.executable, "-m", "benchmarks.step", *step_args, f"--json={path}"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(path) as f:
      return json.load(f)


def main(argv: list[str]) -> dict:
  """The command line in-process: `argv` are the flags (no program name); the results by row."""
  tool_flags.parse(FLAGS, argv, PROG)
  return run()


def run() -> dict:
  args = types.SimpleNamespace(**FLAGS.flag_values_dict())
  try:
    args.batches = [int(b) for b in args.batches if b]
  except ValueError:
    raise SystemExit(f"--batches={','.join(args.batches)}: expected comma-separated integers") from None
  args.variants = [v for v in args.variants if v]
  args.recipes = [r for r in args.recipes if r]
  common = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--image_size={args.image_size}",
            f"--patch={args.patch}", f"--decoder={args.decoder}"]
  results = {}
  print("| row | JAX step ms | JAX img/s | peer step ms | peer img/s | JAX ÷ peer (img/s) | GFLOP/img | "
        "load start → end |")
  print("|---|---|---|---|---|---|---|---|")
  for label, extra in rows(args):
    peers = [f"--peers={args.peers}"] if args.peers else ["--notorch"]
    out = run_step(["--recipes=mae", *peers, *extra, *common], args.timeout)
    r, env = out["results"], out["env"]
    mae = r["mae"]
    peer = r.get("torch-official", {})
    ratio = f"{peer['step_s_median'] / mae['step_s_median']:.3f}" if peer else "-"
    results[label] = out
    print(f"| {label} | {1e3 * mae['step_s_median']:.0f} | {mae['images_per_s']:.2f} | "
          f"{1e3 * peer['step_s_median']:.0f} | {peer['images_per_s']:.2f} | **{ratio}×** | "
          f"{mae['train_gflop_per_image']:.2f} | {env['load_avg'][0]:.2f} → {env['load_avg_end'][0]:.2f} |"
          if peer else
          f"| {label} | {1e3 * mae['step_s_median']:.0f} | {mae['images_per_s']:.2f} | - | - | - | "
          f"{mae['train_gflop_per_image']:.2f} | {env['load_avg'][0]:.2f} → {env['load_avg_end'][0]:.2f} |",
          flush=True)
  if args.recipes:
    out = run_step([f"--recipes={','.join(args.recipes)}", "--notorch", "--corruption",
                    f"--variant={args.base_variant}", f"--batch={args.base_batch}", *common], args.timeout)
    results["recipes"] = out
    r = out["results"]
    from benchmarks.step import PLAIN
    print(f"\nRecipe overhead, ViT-{args.base_variant.upper()} batch {args.base_batch} (JAX), load "
          f"{out['env']['load_avg'][0]:.2f} → {out['env']['load_avg_end'][0]:.2f}:\n")
    print("| recipe | step ms | ÷ its model's plain step | corruption alone ms | GFLOP/img |")
    print("|---|---|---|---|---|")
    for name, v in r.items():
      plain = r.get(PLAIN.get(name, name), {}).get("step_s_median")
      over = f"{v['step_s_median'] / plain:.3f}" if plain else "-"
      print(f"| {name} (vs {PLAIN.get(name, name)}) | {1e3 * v['step_s_median']:.0f} | {over} | "
            f"{1e3 * v.get('corruption_s', 0):.1f} | {v['train_gflop_per_image']:.2f} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2, default=str)
  return results


if __name__ == "__main__":
  tool_flags.run(FLAGS, run)
