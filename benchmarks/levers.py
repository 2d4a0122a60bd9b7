"""One lever at a time: the MAE train step as committed vs the same step with one lever changed.

Both variants are compiled in one process and stepped in turns (A B B A ...), so that load from
other processes hits both alike; the table gives wall and CPU medians and the change. A lever is
either a different model function patched in while the variant is traced, a config change, or
XLA compiler options for that one compilation (no process-wide XLA_FLAGS needed).

  python -m benchmarks.levers                          # every lever below, issue-9 configuration
  python -m benchmarks.levers --levers=remat,bf16 --steps=8
  python -m benchmarks.levers --variant=micro --image_size=32 --batch=4 --steps=1   # smoke (tests)

Flags: `--levers` and those of `benchmarks.step` but its PyTorch peers.
"""

from __future__ import annotations

import contextlib
import statistics

from absl import flags

from benchmarks import step as step_lib
from mae_jax import tool_flags


@contextlib.contextmanager
def _patched(module, name, value):
  old = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, old)


def _full_decoder_tail():
  """The decoder's last block, norm and head on every token in the train step (not only the
  masked ones the loss reads)."""
  from mae_jax.models import mae
  call = mae.MAE.__call__
  return _patched(mae.MAE, "__call__",
                  lambda self, *a, return_pred=True, **k: call(self, *a, return_pred=True, **k))


# name -> (what the changed variant does, context manager factory or None, config words, XLA options)
LEVERS = {
    "full_decoder_tail": ("the decoder's last block and head on all tokens, not only the masked "
                          "ones the loss reads", _full_decoder_tail, {}, None),
    "bf16": ("bfloat16 compute (float32 parameters, softmax and loss)", None,
             {"model.dtype": "bfloat16"}, None),
    "remat": ("every block rematerialised in the backward (model.remat=full)", None,
              {"model.remat": "full"}, None),
    "scan": ("the blocks under nnx.scan (model.scan_layers)", None, {"model.scan_layers": True}, None),
    "onednn_dots": ("XLA:CPU dots through oneDNN fusions", None, {},
                    {"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}),
    "xnnpack_dots": ("XLA:CPU dots through XNNPACK fusions (YNNPACK off)", None, {},
                     {"xla_cpu_use_xnnpack": True,
                      "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
                      "xla_cpu_experimental_ynn_fusion_type": ""}),
    "no_ynn": ("XLA:CPU dots on Eigen (no YNNPACK fusions)", None, {},
               {"xla_cpu_experimental_ynn_fusion_type": ""}),
}


PROG = "python -m benchmarks.levers"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags)
step_lib.define_flags(FLAGS, peers=False)
_LEVERS = flags.DEFINE_list("levers", list(LEVERS), f"Comma list of {', '.join(LEVERS)}.", flag_values=FLAGS)


def namespace(fv: flags.FlagValues):
  """benchmarks.step's namespace (no PyTorch peers) with `levers`, checked."""
  args = step_lib.namespace(fv)
  args.levers = [lv for lv in args.levers if lv]
  for lv in args.levers:
    if lv not in LEVERS:
      raise SystemExit(f"--levers: unknown lever {lv!r}; expected some of {sorted(LEVERS)}")
  return args


def parse_args(argv: list[str]):
  """The command line in-process (`argv` without the program name) as `namespace` gives it."""
  tool_flags.parse(FLAGS, argv, PROG)
  return namespace(FLAGS)


def build(args, images, lever: str | None):
  """The MAE JaxSide as committed (lever None) or with `lever` changed."""
  import copy

  import jax

  if lever is None:
    side = step_lib.JaxSide("mae", args, images)
    side.name = "as committed"
    return side
  _, patch, words, options = LEVERS[lever]
  a = copy.copy(args)
  a.config_overrides = dict(words)
  a.compiler_options = options
  with (patch() if patch else contextlib.nullcontext()):
    jax.clear_caches()  # re-trace with the patched function
    side = step_lib.JaxSide("mae", a, images)
  side.name = lever
  return side


def main(argv: list[str]):
  """The command line in-process: `argv` are the flags (no program name); the table's rows."""
  return run(parse_args(argv))


def run(args):
  threads = step_lib.setup_threads(args.threads)
  import numpy as np
  rng = np.random.default_rng(args.seed)
  images = rng.integers(0, 256, size=(args.batch, args.image_size, args.image_size, args.channels),
                        dtype=np.uint8)
  env = step_lib.environment(threads)
  print(f"# {env['cpu']} | threads {threads}/{env['nproc']} | load avg {env['load_avg'][0]:.2f} "
        , flush=True)
  base = build(args, images, None)
  rows = []
  for lever in args.levers:
    try:
      other = build(args, images, lever)
    except Exception as e:  # a lever this jax/XLA cannot build: say so, go on with the others
      print(f"{lever}: could not build ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
      continue
    for s in (base, other):
      for _ in range(max(args.warmup, 1)):
        s.step()
    times, cpu = step_lib.time_sides([base, other], args.steps)
    b, o = statistics.median(times[base.name]), statistics.median(times[lever])
    bc, oc = statistics.median(cpu[base.name]), statistics.median(cpu[lever])
    temp = lambda s: s.memory.get("temp_size_in_bytes", 0) / 2**20
    rows.append((lever, LEVERS[lever][0], b, o, bc, oc, temp(base), temp(other)))
    print(f"{lever:20s} committed {1e3 * b:7.0f} ms / cpu {1e3 * bc:7.0f} | changed {1e3 * o:7.0f} ms / "
          f"cpu {1e3 * oc:7.0f} | changed is {100 * (o / b - 1):+5.1f}% wall, {100 * (oc / bc - 1):+5.1f}% cpu "
          f"| XLA temp {temp(base):.0f} vs {temp(other):.0f} MiB", flush=True)
    del other
  print(f"# load avg at the end {step_lib.os.getloadavg()[0]:.2f}")
  return rows


if __name__ == "__main__":
  tool_flags.run(FLAGS, lambda: run(namespace(FLAGS)))
