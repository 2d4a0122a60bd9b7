"""Scaling table: the MAE train step at batch 8/32/128 (ViT-S) and for ViT-Ti/S/B (batch 32), each
against the official-style PyTorch peer, one fresh process per row (`benchmarks.step`), and the
recipe overhead of D²MAE, Deblurring MAE and USFM (with its augmentation) over its model's plain
step. Prints a markdown table; `--json` keeps everything.

  python -m benchmarks.scaling                 # the full table (tens of minutes on 2 cores)
  python -m benchmarks.scaling --rows b8 --steps 1 --warmup 1 --image-size 32 --patch 8 \
      --decoder 16x1x2 --variants micro       # smoke (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(args):
  """(label, extra benchmarks.step arguments) of each row."""
  out = []
  for b in args.batches:
    out.append((f"ViT-{args.base_variant.upper()} batch {b}", ["--variant", args.base_variant, "--batch", str(b)]))
  for v in args.variants:
    if v == args.base_variant and args.base_batch in args.batches:
      continue  # already a row
    out.append((f"ViT-{v.upper()} batch {args.base_batch}", ["--variant", v, "--batch", str(args.base_batch)]))
  return out


def run_step(step_args, timeout: int) -> dict:
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "step.json")
    cmd = [sys.executable, "-m", "benchmarks.step", *step_args, "--json", path]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(path) as f:
      return json.load(f)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", default="8,32,128")
  p.add_argument("--variants", default="ti,s,b")
  p.add_argument("--base-variant", default="s")
  p.add_argument("--base-batch", type=int, default=32)
  p.add_argument("--recipes", default="mae,d2mae,deblur,usfm,simmim",
                 help="the overhead row's recipes (empty: no overhead row)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--patch", type=int, default=0)
  p.add_argument("--decoder", default="256x4x8")
  p.add_argument("--peers", default="official")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per row")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(",") if b]
  args.variants = [v for v in args.variants.split(",") if v]
  common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--image-size", str(args.image_size),
            "--patch", str(args.patch), "--decoder", args.decoder]
  results = {}
  print("| row | JAX step ms | JAX img/s | peer step ms | peer img/s | JAX ÷ peer (img/s) | GFLOP/img | "
        "load start → end |")
  print("|---|---|---|---|---|---|---|---|")
  for label, extra in rows(args):
    peers = ["--peers", args.peers] if args.peers else ["--no-torch"]
    out = run_step(["--recipes", "mae", *peers, *extra, *common], args.timeout)
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
    out = run_step(["--recipes", args.recipes, "--no-torch", "--corruption", "--variant", args.base_variant,
                    "--batch", str(args.base_batch), *common], args.timeout)
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
  main()
