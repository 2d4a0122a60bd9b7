"""What a big run on a CPU is in for, said before its first step.

A paper-size step on a CPU is many micro-batches (`train.cpu_micro_batch` images each) of a ViT-B:
compiling and running that first step alone takes many minutes, with nothing on the console. So
when a step is large (`step_flops` of `LARGE_STEP_FLOPS` or more) and the platform is the CPU, one
micro-batch is compiled and timed on its own first, and the run says what a step and the whole run
will take, that such a run is for accelerators (and how to launch it there), and how long a SIGTERM
may take to act: the step in flight finishes first. Small runs (smoke, demo) skip it: the timing
compiles the model once more.

Self-contained: the caller passes the function of one micro-batch and its arguments; nothing here
knows the model or the loop.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from mae_jax.train.writers import format_eta

# From here a step takes many seconds on a few CPU cores (a ViT-Ti step of 1024 images is ~7e12).
LARGE_STEP_FLOPS = 1e12


def step_flops(n_params: int, batch_size: int, tokens: int) -> float:
  """A step's forward and backward, roughly: 6 FLOPs per parameter, token and image (an upper bound
  for MAE, whose encoder sees only the visible tokens; enough to tell small runs from large)."""
  return 6.0 * n_params * batch_size * tokens


def wanted(platform: str, flops: float) -> bool:
  """Whether a run is worth timing up front: a large step on a CPU."""
  return platform == "cpu" and flops >= LARGE_STEP_FLOPS


def time_call(fn, *args) -> tuple[float, float]:
  """(compile seconds, seconds of one call after compiling) of `jax.jit(fn)(*args)`."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  t1 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return t1 - t0, time.perf_counter() - t1


def format_duration(seconds: float) -> str:
  """`format_eta` up to a day, then days (a CPU run of a paper recipe lasts months)."""
  if seconds < 86400:
    return format_eta(seconds)
  days = seconds / 86400
  return f"{days:.0f} days" if days < 730 else f"{days / 365:.0f} years"


def lines(*, micro_seconds: float, compile_seconds: float, micro_batch: int, micro_batches: int,
          steps_left: int, platform: str, command: str = "", log_every: int = 0,
          checkpoint_every: int = 0) -> list[str]:
  """The console lines: step time and run time from one micro-batch's time, where to run it instead,
  and how long a SIGTERM may wait. `command`: the run's `--config=... --workdir=...` arguments."""
  step = micro_seconds * micro_batches
  total = step * steps_left
  out = [f"{platform.upper()} cost estimate: one micro-batch of {micro_batch} images ran in "
         f"{micro_seconds:.1f}s (compiled in {compile_seconds:.0f}s); a step is {micro_batches} "
         f"micro-batch{'es' * (micro_batches != 1)}, about {format_duration(step)}, and the "
         f"{steps_left} steps left take about {format_duration(total)} (the first step compiles again)."]
  if total > 3600:
    args = command or "--config=CONFIG --workdir=DIR"
    out.append(f"A run this size is meant for accelerators: e.g. `sbatch launch/slurm.sbatch {args}` "
               "(GPUs) or `launch/tpu_pod.sh run ...` (TPU), see launch/README.md; on this machine "
               "try the `:demo` variant (minutes) or `:smoke`.")
  out.append(f"SIGTERM / Ctrl-C acts at the next step boundary: the step in flight finishes first "
             f"(up to about {format_duration(step)}), then a checkpoint is saved.")
  if log_every and step * log_every > 600:
    out.append(f"metrics.jsonl gets a line every {log_every} steps (about "
               f"{format_duration(step * log_every)}); checkpoints every {checkpoint_every} steps.")
  return out


def micro_batch_lines(loss_fn, params, rest, *, batch_size: int, micro_batches: int, image_size: int,
                      in_chans: int, steps_left: int, platform: str, log_every: int = 0,
                      checkpoint_every: int = 0) -> list[str]:
  """Compiles and times the gradient of `loss_fn(params, rest, images_uint8, key, zoom)` on one
  micro-batch (batch_size / micro_batches images; pixel values do not change its time), then `lines`."""
  micro = batch_size // micro_batches
  images = np.zeros((micro, image_size, image_size, in_chans), np.uint8)
  zoom = np.ones((micro, 2), np.float32)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  compile_s, run_s = time_call(grad_fn, params, rest, images, jax.random.key(0), zoom)
  return lines(micro_seconds=run_s, compile_seconds=compile_s, micro_batch=micro,
               micro_batches=micro_batches, steps_left=steps_left, platform=platform,
               command=_cli_args(), log_every=log_every, checkpoint_every=checkpoint_every)


def _cli_args() -> str:
  # The --config and --workdir of `python -m mae_jax.main`, for the launcher line.
  return " ".join(a for a in sys.argv[1:] if a.startswith(("--config", "--workdir")))
