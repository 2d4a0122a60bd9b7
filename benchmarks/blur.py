"""Gaussian blur on device: the hand-written separable kernel vs dm_pix.gaussian_blur.

Both reflect-pad (reflect-101) and convolve VALID; dm-pix is vmapped for a per-sample σ. Prints,
per case, the median wall time of the jitted blur of one batch and the largest difference from
cv2.GaussianBlur (BORDER_REFLECT_101) with the same σ and kernel size.

  python -m benchmarks.blur                       # batch 32, 224 x 224 x 1, kernel sizes 9 and 17
  python -m benchmarks.blur --batch=8 --size=64   # smaller
"""

from __future__ import annotations

import os
import statistics
import time
import types

from absl import flags

from mae_jax import tool_flags


PROG = "python -m benchmarks.blur"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags): the benchmarks share flag names
flags.DEFINE_integer("batch", 32, "Images per batch.", flag_values=FLAGS)
flags.DEFINE_integer("size", 224, "Image side (px).", flag_values=FLAGS)
flags.DEFINE_list("kernels", ["9", "17"], "Kernel sizes (9: σ 1.1; 17: σ 1.1 at zoom 2.26).",
                             flag_values=FLAGS)
flags.DEFINE_integer("repeats", 15, "Timed calls per case.", flag_values=FLAGS)


def main(argv: list[str]) -> None:
  """The command line in-process: `argv` are the flags (no program name)."""
  tool_flags.parse(FLAGS, argv, PROG)
  run()


def run() -> None:
  args = types.SimpleNamespace(**FLAGS.flag_values_dict())
  import cv2
  import jax
  import numpy as np

  from mae_jax.corrupt import blur

  x = np.random.default_rng(0).random((args.batch, args.size, args.size, 1), dtype=np.float32)
  print(f"jax {jax.__version__} on {jax.default_backend()}, batch {args.batch} x {args.size}^2 x 1, "
        f"load {os.getloadavg()[0]:.1f}")
  print(f"{'case':34s} {'k':>3s} {'median ms':>10s} {'max |Δ| vs cv2':>15s}")
  for k in (int(v) for v in args.kernels):
    s_max = (k - 1) / 6  # the largest σ whose OpenCV size is k
    per = np.linspace(0.3, s_max, args.batch).astype(np.float32)
    axes = np.stack([per, per[::-1]], axis=1)  # (σ_y, σ_x), different per axis
    cases = [("separable, one σ", 1.1, "separable"), ("dm_pix, one σ", 1.1, "dm_pix"),
             ("separable, per-sample σ", per, "separable"), ("dm_pix (vmap), per-sample σ", per, "dm_pix"),
             ("separable, per-sample per-axis σ", axes, "separable")]
    for name, sigma, impl in cases:
      fn = jax.jit(lambda a, s, impl=impl: blur.gaussian_blur(a, s, kernel_size=k, impl=impl))
      y = np.asarray(fn(x, sigma))
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn(x, sigma).block_until_ready()
        times.append(time.perf_counter() - t0)
      sig = np.broadcast_to(np.asarray(sigma, np.float32).reshape(-1, 1) if np.ndim(sigma) < 2
                            else np.asarray(sigma), (args.batch, 2))
      ref = np.stack([cv2.GaussianBlur(x[i, ..., 0], (k, k), float(sig[i, 1]), sigmaY=float(sig[i, 0]),
                                       borderType=cv2.BORDER_REFLECT_101) for i in range(args.batch)])
      err = float(np.abs(y[..., 0] - ref).max())
      print(f"{name:34s} {k:3d} {statistics.median(times) * 1e3:10.2f} {err:15.2e}")


if __name__ == "__main__":
  tool_flags.run(FLAGS, run)
