"""Host input pipeline alone: images/s (and per core) for decode + random resized crop + flip.

Runs `mae_jax.data.pipeline.train_iterator` over `mae_jax.data.sources.open_source(config.data,
'train')` exactly as the trainer calls it (the built-in `us_phantom` dataset by default, built on
first use), pulls batches as fast as it can and reports throughput, with no model step behind it.

  python -m benchmarks.input_pipeline                         # threads = nproc, 224 px, 1 channel
  python -m benchmarks.input_pipeline --threads=1             # one reader thread
  python -m benchmarks.input_pipeline --step_json=/tmp/step.json   # + ratio to a measured step

Per core = images per CPU-second of the whole process (reader threads, batching and main thread),
i.e. what one fully busy core sustains. With `--step_json` (written by `python -m benchmarks.step --json`) it also
prints pipeline images/s ÷ train-step images/s: the host keeps up when that is well above 1.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import types

from absl import flags

from mae_jax import tool_flags

PROG = "python -m benchmarks.input_pipeline"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags): the benchmarks share flag names
flags.DEFINE_string("config", "configs/mae.py", "Config file whose `data` section is read.", flag_values=FLAGS)
flags.DEFINE_string("config_args", "", "Its argument string, e.g. 'smoke'.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Crop side (px).", flag_values=FLAGS)
flags.DEFINE_integer("channels", 1, "1 (ultrasound) or 3 (grey repeated).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 32, "Images per batch.", flag_values=FLAGS)
flags.DEFINE_integer("batches", 20, "Timed batches.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "Untimed batches (fills the prefetch buffer).", flag_values=FLAGS)
flags.DEFINE_integer("threads", 0, "grain reader threads (0: nproc).", flag_values=FLAGS)
flags.DEFINE_integer("num_train", 0, "Override data.num_train (0: the config's).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Override data.data_dir.", flag_values=FLAGS)
flags.DEFINE_string("step_json", "", "A benchmarks.step --json result to compare with.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the results here.", flag_values=FLAGS)


def load_config(path: str, arg: str):
  from mae_jax import config_files
  return config_files.load(path, arg)


def measure(source, config, args, threads: int) -> dict:
  from mae_jax.data import pipeline
  it = pipeline.train_iterator(
      source, global_batch=args.batch, image_size=args.image_size, seed=config.data.seed,
      scale=(config.data.crop_scale_min, 1.0), hflip=config.data.hflip,
      sampler=config.data.sampler, in_chans=args.channels, num_threads=threads)
  for _ in range(args.warmup):
    next(it)
  # Time each batch; the median batch interval is robust to a stall from another process.
  times = []
  c0, t0 = time.process_time(), time.perf_counter()
  last = t0
  for _ in range(args.batches):
    batch = next(it)
    now = time.perf_counter()
    times.append(now - last)
    last = now
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  assert batch["image"].shape == (args.batch, args.image_size, args.image_size, args.channels)
  ips = args.batch / statistics.median(times)
  n = args.batch * args.batches
  # Per core = images per second of CPU time used by the whole process (reader threads, batching
  # and the main thread alike): what one fully busy core sustains, whatever the thread count.
  return {"threads": threads, "images_per_s": ips, "images_per_s_mean": n / wall,
          "images_per_s_per_core": n / cpu, "cpu_ms_per_image": 1e3 * cpu / n}


def main(argv: list[str]) -> dict:
  """The command line in-process: `argv` are the flags (no program name); the measurement."""
  tool_flags.parse(FLAGS, argv, PROG)
  return run()


def run() -> dict:
  args = types.SimpleNamespace(**FLAGS.flag_values_dict())
  threads = args.threads or len(os.sched_getaffinity(0))
  from mae_jax.data import sources
  config = load_config(args.config, args.config_args)
  if args.num_train:
    config.data.num_train = args.num_train
  if args.data_dir:
    config.data.data_dir = args.data_dir
  t0 = time.perf_counter()
  source = sources.open_source(config.data, "train")
  open_s = time.perf_counter() - t0
  print(f"# {config.data.name}: {len(source)} train records at {config.data.native_size} px "
        f"(opened in {open_s:.1f}s) -> {args.image_size} px x {args.channels}, batch {args.batch}; "
        f"load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
  res = measure(source, config, args, threads)
  res["load_avg"] = os.getloadavg()
  print(f"reader threads {res['threads']}: {res['images_per_s']:.0f} images/s "
        f"(mean {res['images_per_s_mean']:.0f}), {res['images_per_s_per_core']:.0f} images/s per core, "
        f"{res['cpu_ms_per_image']:.2f} ms CPU per image")
  if args.step_json:
    with open(args.step_json) as f:
      step = json.load(f)["results"]
    for name, r in step.items():
      if "images_per_s" in r:
        print(f"  pipeline / {name} train step = {res['images_per_s'] / r['images_per_s']:.1f}x "
              f"({r['images_per_s']:.2f} images/s)")
        res[f"vs_{name}"] = res["images_per_s"] / r["images_per_s"]
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == "__main__":
  tool_flags.run(FLAGS, run)
