"""Experiment sweeps: one command per paper table, pretraining + transfer for every row over several
seeds, written as a markdown/JSON table of mean ± 95% CI (Student t across seeds).

  python -m mae_jax.sweeps --experiment=d2mae_table3 --root=runs/t3 --scale=tiny --seeds=3
  python -m mae_jax.sweeps --experiment=deblur_table1 --root=runs/t1 --scale=paper --seeds=5
  python -m mae_jax.sweeps --list

An experiment lives in `configs/experiments/<name>.py` as `get_experiment()` returning a dict:

  title:      the table's caption
  reference:  the label of the row the others are t-tested against (Welch, two-sided, over seeds)
  rows:       list of {'label': {column: text, ...},
                       'pretrain': (config name, ARGS),    # configs/<name>.py:ARGS; None: no
                                                           # pretraining (the transfer sets scratch=)
                       'transfer': (config name, ARGS)}    # configs/finetune.py, segment.py, enhance.py
  references: optional {'classify': label, 'segment': label}: the reference row per kind of
              transfer (segmentation rows report Dice / IoU / HD95 and are t-tested on Dice)
  metrics:    (optional) the test metrics in the table for every row, the first one t-tested;
              default by the transfer's kind (KIND_METRICS)
  after:      (optional) `after(results, root)` once the table is written

Scales: `tiny` prefixes every ARGS with `smoke` (micro ViT, 32 px; a table of ~10 rows takes
about 10 minutes per seed on 2 CPU cores); `paper` uses the configs as published (ViT-B, 224 px,
the papers' epochs: for GPU/TPU pods). `--pretrain_override` / `--transfer_override` (dotted
`key=value`, repeatable) set anything else, e.g. a middle scale (`train.epochs=200`) or a real
downstream dataset (`data.name=folder`, `data.folder=DIR`).

Identical pretraining specs are trained once per seed and shared between rows (D²MAE Table 3 has
five distinct pretrainings for twelve rows), identical transfer runs likewise; a finished run
(`train_done.json`, `results.json`) is not repeated, so an interrupted sweep resumes where it stopped.
Seed s sets both the pretraining and the transfer seed (the label-efficiency subset included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time

import numpy as np
from absl import flags

from mae_jax import config_files, evaluate, tool_flags
from mae_jax.train import workdir_lock

log = logging.getLogger("mae_jax")

SCALES = ("tiny", "paper")
METRICS = ("macro_f1", "accuracy", "auroc")
SEG_METRICS = ("dice", "iou", "hd95")  # segmentation rows (configs/segment.py transfers)
OPTIONAL = ("f1_positive",)  # shown when the runs report it (paper=deblur: the positive class's F1)
ENH_METRICS = ("ssim", "lncc", "nmi_sym", "nmi")  # enhancement rows (configs/enhance.py transfers)
KIND_METRICS = {"classify": METRICS, "segment": SEG_METRICS, "enhance": ENH_METRICS}


def row_metrics(exp: dict, kind: str) -> tuple[str, ...]:
  """A row's table columns: the experiment's `metrics`, else those of its transfer's kind; the
  first is the one its t-test compares."""
  return tuple(exp.get("metrics") or KIND_METRICS[kind])


def main_metric(exp: dict, kind: str) -> str:
  return row_metrics(exp, kind)[0]
EXPERIMENTS_DIR = os.path.join(config_files.CONFIG_DIR, "experiments")


# ------------------------------------------------------------------------------------ loading


def list_experiments() -> list[str]:
  if not os.path.isdir(EXPERIMENTS_DIR):
    return []
  return sorted(f[:-3] for f in os.listdir(EXPERIMENTS_DIR) if f.endswith(".py") and not f.startswith("_"))


def get_experiment(name: str) -> dict:
  path = os.path.join(EXPERIMENTS_DIR, f"{name}.py")
  if not os.path.exists(path):
    raise ValueError(f"--experiment={name!r}: no {path}; known: {list_experiments()}")
  exp = config_files.load_module(path).get_experiment()
  labels = [_label_text(r["label"]) for r in exp["rows"]]
  if len(set(labels)) != len(labels):
    raise ValueError(f"experiment {name!r}: two rows share a label")
  refs = [exp.get("reference")] + list((exp.get("references") or {}).values())
  for ref in refs:
    if ref is not None and ref not in labels:
      raise ValueError(f"experiment {name!r}: reference {ref!r} is not a row label")
  return exp


def _label_text(label: dict) -> str:
  return " / ".join(str(v) for v in label.values())


def scaled_args(args: str, scale: str) -> str:
  if scale not in SCALES:
    raise ValueError(f"--scale={scale!r}: expected one of {SCALES}")
  parts = [p for p in (args or "").split(",") if p]
  if scale == "tiny" and "smoke" not in parts:
    parts = ["smoke"] + parts
  return ",".join(parts)


def parse_overrides(items) -> dict:
  out = {}
  for item in items or []:
    if "=" not in item:
      raise ValueError(f"override {item!r}: expected key=value")
    key, value = item.split("=", 1)
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        continue
    else:
      if value.lower() in ("true", "false"):
        value = value.lower() == "true"
    out[key] = value
  return out


def load_config(name: str, args: str, overrides: dict | None = None):
  return config_files.load(name, args, overrides)


# ------------------------------------------------------------------------------------- plan


def _slug(name: str, args: str) -> str:
  text = f"{name}__{args}" if args else name
  safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")
  if len(safe) > 80:
    safe = safe[:60] + "_" + hashlib.sha1(text.encode()).hexdigest()[:10]
  return safe


def plan(exp: dict, root: str, *, seeds, scale: str) -> list[dict]:
  """Every (row, seed) with its pretraining and transfer workdirs (shared where specs repeat)."""
  out = []
  for row in exp["rows"]:
    t_name, t_args = row["transfer"]
    t_args = scaled_args(t_args, scale)
    kind = t_name if t_name in ("segment", "enhance") else "classify"
    for seed in seeds:
      if row.get("pretrain") is None:  # a baseline without pretraining
        pre, stem, p_name, p_args = None, "scratch", None, None
      else:
        p_name, p_args = row["pretrain"]
        p_args = scaled_args(p_args, scale)
        stem = _slug(p_name, p_args)
        pre = os.path.join(root, "pretrain", f"{stem}__seed{seed}")
      ft = os.path.join(root, "transfer", f"{stem}__{_slug(t_name, t_args)}__seed{seed}")
      out.append({"label": row["label"], "seed": seed, "pretrain": (p_name, p_args, pre),
                  "transfer": (t_name, t_args, ft), "kind": kind})
  return out


def selection_metric(config) -> str:
  """The validation metric that picks a transfer job's kept epoch, and how often it is evaluated."""
  every = int(config.get("eval", {}).get("every_epochs", 1) or 1)
  if config.job == "segment":
    metric = "dice"
  elif config.job == "enhance":
    metric = "ssim"
  else:
    metric = config.eval.get("select", "macro_f1")
  return metric + (f" every {every} epochs" if every > 1 else "")


def protocol(job: dict, pretrain_overrides=None, transfer_overrides=None) -> str:
  """One line for a planned run: the pretraining batch and length, the transfer's selection metric,
  so a reader can check a table's protocol without opening configs."""
  p_name, p_args, _ = job["pretrain"]
  parts = []
  if p_name:
    pc = load_config(p_name, p_args, dict(pretrain_overrides or {}))
    t = pc.train
    length = f"{int(t.total_steps)} steps" if t.total_steps else f"{t.epochs:g} epochs"
    parts.append(f"pretrain batch {int(t.batch_size)}, {length}")
  t_name, t_args, _ = job["transfer"]
  tc = load_config(t_name, t_args, dict(transfer_overrides or {}))
  parts.append(f"{tc.job} selects on validation {selection_metric(tc)}")
  return "; ".join(parts)


# -------------------------------------------------------------------------------------- run


class Preempted(Exception):
  """A job of the sweep stopped on SIGTERM with its checkpoint saved: the sweep stops too (the next
  runs would start from an unfinished pretraining) and the same command resumes it."""


def _stop_if_preempted(result, what: str, workdir: str) -> None:
  if isinstance(result, dict) and result.get("preempted"):
    raise Preempted(f"{what} in {workdir} was preempted at step {result.get('step')}")


def _pretrain(name, args, workdir, seed, overrides):
  if os.path.exists(os.path.join(workdir, "train_done.json")):
    return
  from mae_jax.train import pretrain
  config = load_config(name, args, {**overrides, "seed": seed})
  log.info("sweep: pretraining configs/%s.py:%s seed %d -> %s", name, args, seed, workdir)
  _stop_if_preempted(pretrain.train(config, workdir), "pretraining", workdir)


def _transfer(name, args, workdir, pre, seed, overrides) -> dict:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    from mae_jax.train import finetune, segment
    config = load_config(name, args, {**overrides, "seed": seed, **({"init_from": pre} if pre else {})})
    if config.job == "enhance":  # image enhancement (USFM Table 4)
      from mae_jax.train import enhance
      job = enhance.run
    elif config.job in finetune.JOBS + ("segment",):
      job = segment.run if config.job == "segment" else finetune.run
    else:
      raise ValueError(f"configs/{name}.py is a {config.job!r} job: sweeps run classification "
                       f"({finetune.JOBS}), segmentation or enhancement transfer")
    if pre is None and not config.get("scratch"):
      raise ValueError(f"a row without pretraining needs scratch=NAME in its transfer ARGS ({args!r})")
    log.info("sweep: %s configs/%s.py:%s seed %d -> %s", config.job, name, args, seed, workdir)
    _stop_if_preempted(job(config, workdir), config.job, workdir)
  with open(path) as f:
    return json.load(f)


def run_sweep(exp: dict, root: str, *, seeds, scale: str = "tiny", pretrain_overrides=None,
              transfer_overrides=None, name: str = "sweep", pretrain_fn=_pretrain,
              transfer_fn=_transfer) -> dict:
  """Runs (or reuses) every pretraining and transfer of the experiment and writes
  `<root>/<name>.json` and `<root>/<name>.md`. Returns the results dict."""
  root = os.path.abspath(os.path.expanduser(root))
  with workdir_lock.hold(root):  # one sweep per root; each job also locks its own workdir
    return _run_sweep(exp, root, seeds=seeds, scale=scale, pretrain_overrides=pretrain_overrides,
                      transfer_overrides=transfer_overrides, name=name, pretrain_fn=pretrain_fn,
                      transfer_fn=transfer_fn)


def _run_sweep(exp, root, *, seeds, scale, pretrain_overrides, transfer_overrides, name, pretrain_fn,
               transfer_fn) -> dict:
  jobs = plan(exp, root, seeds=seeds, scale=scale)
  metrics = tuple(exp.get("metrics", METRICS))  # the experiment's columns
  per_row: dict[str, dict] = {}
  done_pre, done_ft = set(), {}
  t0 = time.perf_counter()
  for i, job in enumerate(jobs):
    p_name, p_args, pre = job["pretrain"]
    t_name, t_args, ft = job["transfer"]
    if pre is not None and pre not in done_pre:
      pretrain_fn(p_name, p_args, pre, job["seed"], dict(pretrain_overrides or {}))
      done_pre.add(pre)
    if ft not in done_ft:
      done_ft[ft] = transfer_fn(t_name, t_args, ft, pre, job["seed"], dict(transfer_overrides or {}))
    res = done_ft[ft]
    key = _label_text(job["label"])
    names = row_metrics(exp, job["kind"]) + tuple(m for m in OPTIONAL if m in res["test"])
    entry = per_row.setdefault(key, {"label": job["label"], "seeds": [], "workdirs": [],
                                     "kind": job["kind"], **{m: [] for m in names}})
    entry["seeds"].append(job["seed"])
    entry["workdirs"].append(ft)
    for m in names:
      v = res["test"][m]["value"]
      entry.setdefault(m, []).append(float("nan") if v is None else float(v))
    main = main_metric(exp, job["kind"])
    log.info("sweep %s: %d/%d done (%s, seed %d: %s %.4f) after %.0fs", name, i + 1, len(jobs),
             key, job["seed"], main, entry[main][-1], time.perf_counter() - t0)

  ref = exp.get("reference")
  refs = {"classify": ref, **(exp.get("references") or {})}
  rows = []
  for key, e in per_row.items():
    row = {k: str(v) for k, v in e["label"].items()}
    names = row_metrics(exp, e["kind"]) + tuple(m for m in OPTIONAL if m in e)
    row.update({m: list(e[m]) for m in names})
    r = refs.get(e["kind"])
    if r is not None and len(e["seeds"]) >= 2 and per_row[r]["kind"] == e["kind"]:
      main = main_metric(exp, e["kind"])
      if key == r:
        row["p (vs ref)"] = "ref"
      else:
        _, p = evaluate.ttest(e[main], per_row[r][main])
        row["p (vs ref)"] = "nan" if not np.isfinite(p) else f"{p:.3g}"
    rows.append(row)
  metrics = []
  for kind in dict.fromkeys(e["kind"] for e in per_row.values()):
    metrics += [m for m in row_metrics(exp, kind) if m not in metrics]
  metrics += [m for m in OPTIONAL if any(m in e for e in per_row.values())]
  results = {"rows": rows, "title": exp.get("title", name), "scale": scale, "seeds": list(seeds),
             "metrics": "test set; mean ± sample std across seeds [95% Student-t interval of the mean]",
             "reference": ref, "runs": {k: e["workdirs"] for k, e in per_row.items()},
             "pretrain_overrides": pretrain_overrides or {}, "transfer_overrides": transfer_overrides or {}}
  json_path, md_path = evaluate.write_results(root, name, results, metrics=metrics)
  against = "; ".join(f"{main_metric(exp, k)} against `{v}`" for k, v in refs.items() if v is not None)
  with open(md_path, "a") as f:
    f.write(f"\n{results['title']} — scale `{scale}`, seeds {list(seeds)}; {results['metrics']}; "
            f"p: Welch two-sided t-test of {against or 'nothing (no reference row)'}.\n")
  log.info("sweep %s: table written to %s", name, md_path)
  if exp.get("after"):  # the experiment's own extras (e.g. Table 4's figures), from its runs
    exp["after"](results, root)
  return results


# -------------------------------------------------------------------------------------- CLI


# The sweep's own flag set: importing this module beside another absl tool (tests do) defines no flag
# in absl's global FLAGS that could clash with theirs.
FLAGS = flags.FlagValues()
flags.DEFINE_string("experiment", None, "a file of configs/experiments/ (without .py)", flag_values=FLAGS)
flags.DEFINE_string("root", None, "where the runs and the table go", flag_values=FLAGS)
flags.DEFINE_enum("scale", "tiny", SCALES, "tiny: smoke configs; paper: as published", flag_values=FLAGS)
flags.DEFINE_integer("seeds", 3, "seeds 0..N-1", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_multi_string("pretrain_override", [], "KEY=VALUE on every pretraining config (repeatable)",
                          flag_values=FLAGS)
flags.DEFINE_multi_string("transfer_override", [], "KEY=VALUE on every transfer config (repeatable)",
                          flag_values=FLAGS)
flags.DEFINE_bool("list", False, "list the experiments and exit", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "print the runs and each row's protocol, and exit", flag_values=FLAGS)


def _usage_error(message: str) -> int:
  print(f"python -m mae_jax.sweeps: {message} (--help lists the flags)", file=sys.stderr, flush=True)
  return 2


def main(argv=None) -> int:
  """The command line (`argv` without the program name; default `sys.argv[1:]`): 0 done, 2 a
  rejected command line."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
    print(__doc__.split("\n\n")[0] + "\n\nflags:\n" + FLAGS.get_help(include_special_flags=False))
    return 0
  try:
    tool_flags.parse(FLAGS, argv, "python -m mae_jax.sweeps")
  except SystemExit as e:  # an unknown flag, a value of the wrong type or out of range
    print(f"{e} (--help lists the flags)", file=sys.stderr, flush=True)
    return 2
  args = FLAGS
  if args.list:
    for name in list_experiments():
      print(f"{name}: {get_experiment(name).get('title', '')}")
    return 0
  if not args.experiment or not args.root:
    return _usage_error("--experiment and --root are required")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s",
                      datefmt="%H:%M:%S", stream=sys.stdout, force=True)
  for noisy in ("absl", "orbax", "jax._src", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  exp = get_experiment(args.experiment)
  seeds = list(range(args.seeds))
  if args.dry_run:
    for job in plan(exp, args.root, seeds=seeds, scale=args.scale):
      pre = "configs/%s.py:%s" % job["pretrain"][:2] if job["pretrain"][0] else "no pretraining"
      print(_label_text(job["label"]), "seed", job["seed"], "|", pre, "->",
            "configs/%s.py:%s" % job["transfer"][:2], "|",
            protocol(job, parse_overrides(args.pretrain_override),
                     parse_overrides(args.transfer_override)))
    return 0
  try:
    run_sweep(exp, args.root, seeds=seeds, scale=args.scale,
              pretrain_overrides=parse_overrides(args.pretrain_override),
              transfer_overrides=parse_overrides(args.transfer_override), name=args.experiment)
  except Preempted as e:  # a clean stop, like the jobs': the scheduler requeues, the rerun resumes
    log.warning("sweep stopped: %s; run the same command again to resume", e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
