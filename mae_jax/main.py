"""Command line: `python -m mae_jax.main --config=configs/NAME.py[:ARGS] --workdir=DIR`.

`--config.a.b=value` overrides any field. The job (pretrain, finetune, linear_probe, segment, obs,
enhance)
comes from `config.job`. Relative paths (the workdir, `init_from`) are relative to the current
directory, and are written absolute into the workdir's config.json.

A mistake on the command line or in the config (an unknown field or config file, a wrong type, a bad
ARGS item, a value the job rejects) prints one or two lines and exits with status 2 before anything
is created; `--verbose` (or the environment variable MAE_JAX_VERBOSE=1) adds the traceback.

Every workdir gets `log.txt`: the console lines of every run in it, appended, and what is too long
for the console (the parameter table, validation scalars, library warnings routed through absl). The last line says
where the results are; a run that is already complete says so and exits 0 without doing anything.
"""

from __future__ import annotations

import difflib
import glob
import json
import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from mae_jax import workdir as workdir_identity

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, with :ARGS.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs, figures and results go.")
flags.DEFINE_bool("verbose", False, "With a rejected command line or config, print the traceback too "
                  "(also: environment variable MAE_JAX_VERBOSE=1).")

log = logging.getLogger("mae_jax")

EXIT_USAGE = 2
JOBS = ("pretrain", "finetune", "linear_probe", "segment", "obs", "enhance")


# ------------------------------------------------------------------------------------ mistakes


class UsageError(ValueError):
  """A rejected command line: `lines` (one or two) are all the user sees."""

  def __init__(self, *lines: str):
    super().__init__(lines[0])
    self.lines = [line for line in lines if line]


def _verbose(argv=()) -> bool:
  return os.environ.get("MAE_JAX_VERBOSE", "") not in ("", "0") or "--verbose" in argv


def _reject(error: Exception, argv=()) -> None:
  if _verbose(argv):
    traceback.print_exc()
  lines = error.lines if isinstance(error, UsageError) else [str(error)]
  if len(lines) == 1 and not _verbose(argv):
    lines = lines + ["(the traceback: add --verbose, or set MAE_JAX_VERBOSE=1)"]
  print(f"mae_jax.main: error: {lines[0]}", file=sys.stderr)
  for line in lines[1:]:
    print(f"  {line}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _closest(word: str, names, n: int = 3) -> str:
  close = difflib.get_close_matches(word, list(names), n=n, cutoff=0.5)
  return f" (did you mean {' or '.join(close)}?)" if close else ""


def _config_files() -> list[str]:
  from mae_jax import config_files
  return sorted(os.path.relpath(p, config_files.REPO) for p in glob.glob(os.path.join(config_files.CONFIG_DIR, "*.py")))


def _flag_value(args: list[str], name: str) -> str | None:
  for i, a in enumerate(args):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(args):
      return args[i + 1]
  return None


def _fields(config, prefix: str = "") -> list[str]:
  import ml_collections
  out = []
  for k in config.keys():
    v = config[k]
    out.append(prefix + k)
    if isinstance(v, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
      out += _fields(v, prefix + k + ".")
  return out


def check_command_line(args: list[str]) -> None:
  """The config file, its ARGS and the names of the `--config.a.b` overrides, before absl parses
  them (its own errors are tracebacks): UsageError on a mistake."""
  spec = _flag_value(args, "config")
  if spec is None:
    raise UsageError("--config is required: --config=configs/NAME.py[:ARGS] --workdir=DIR",
                     "config files: " + ", ".join(_config_files()))
  if _flag_value(args, "workdir") is None:
    raise UsageError("--workdir is required: --workdir=DIR (created if missing; relative to the "
                     "current directory)")
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    names = _config_files()
    raise UsageError(f"no config file {path!r}{_closest(path, names, n=2)}",
                     "config files: " + ", ".join(names))
  from mae_jax import config_files
  try:
    config = config_files.load_module(path).get_config(arg or None)
  except (ValueError, TypeError, KeyError) as e:
    raise UsageError(f"--config={spec}: {e}") from e
  fields = _fields(config)
  for a in args:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    if key not in fields:
      parent = key.rpartition(".")[0]
      here = [f for f in fields if f.rpartition(".")[0] == parent]
      raise UsageError(f"--config.{key}: {path} has no field {key!r}{_closest(key, fields)}",
                       f"fields{' under ' + parent if parent else ''}: {', '.join(here)}" if len(here) <= 40
                       else "")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, after our checks; every mistake exits 2 with a short message."""
  try:
    if not {"-h", "-?", "--help", "--helpshort", "--helpfull"} & set(argv[1:]):
      check_command_line(argv[1:])
    return flags.FLAGS(argv)
  except UsageError as e:
    _reject(e, argv)
  except flags.Error as e:  # a value of the wrong type, an unknown flag
    _reject(UsageError(str(e)), argv)


def check(config) -> None:
  """The job's config checks (the same the job makes first), here before the workdir exists: a
  rejected run creates nothing. ValueError names the field."""
  import jax

  from mae_jax import validate
  job = config.get("job", "pretrain")
  n = jax.device_count()
  if job in JOBS:
    validate.validate_folder(config)
  if job == "pretrain":
    validate.validate_pretrain(config, num_devices=n, process_count=jax.process_count())
    return
  if job not in JOBS:
    raise ValueError(f"config.job={job!r}: expected one of {', '.join(JOBS)}")
  if job == "enhance":  # init_from is optional: without it, plain CycleGAN
    from mae_jax.train import enhance
    enhance.validate_config(config, n)
    validate.validate_transfer(config)
    return
  if job in ("finetune", "linear_probe"):
    from mae_jax.train import finetune
    finetune.validate_config(config, n)
  elif job == "segment":
    from mae_jax.train import segment
    segment.validate_config(config, n)
  elif not config.get("init_from"):
    raise ValueError("config.init_from is empty: set it to a D²MAE pretraining workdir")
  validate.validate_transfer(config)
  from mae_jax.data import transforms  # data.interpolation, data.eval_crop_pct, train.randaugment
  transforms.check_config(config)


# ------------------------------------------------------------------------------------ logging


# The console shows our lines and other libraries' warnings and errors, each once. What libraries
# log through absl (orbax's checkpoint notes, and the tracebacks its save threads log for a write the
# disk refused, before the main thread learns of it) goes to log.txt only: the checkpoint layer turns
# what matters into one line of its own (docs/console.md names them).
_CONSOLE_MIN_LEVEL = {"absl": logging.CRITICAL + 1}
_LIBRARY_LEVELS = {"absl": logging.WARNING, "orbax": logging.WARNING, "jax._src": logging.WARNING,
                   "grain": logging.WARNING, "matplotlib": logging.WARNING, "PIL": logging.WARNING}


class _Once(logging.Filter):
  """Other libraries' warnings once each (a fallback logged at every use says nothing new);
  on the console also: no `mae_jax.log_file` lines (the parameter table, the scalars a job reports
  in its own line) and no absl-routed lines."""

  def __init__(self, console: bool):
    super().__init__()
    self.console = console
    self._warned = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if self.console and (record.name == "mae_jax.log_file"
                         or record.levelno < _CONSOLE_MIN_LEVEL.get(record.name, logging.NOTSET)):
      return False
    if record.name == "mae_jax" or record.name.startswith("mae_jax."):
      return True
    if record.levelno < logging.WARNING:
      return False
    if record.levelno == logging.WARNING:
      key = (record.name, record.getMessage())
      if key in self._warned:
        return False
      self._warned.add(key)
    return True


_FORMAT = logging.Formatter("%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")


def _setup_logging():
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
  for handler in logging.getLogger().handlers:
    handler.setFormatter(_FORMAT)
    handler.addFilter(_Once(console=True))
  logging.captureWarnings(True)  # Python warnings through the same filter: once each
  for name, level in _LIBRARY_LEVELS.items():
    logging.getLogger(name).setLevel(level)


class _LogFileHandler(logging.FileHandler):
  """A log file that stops, silently, once its disk refuses a write (full, read-only): logging's
  own handler prints a '--- Logging error ---' traceback for every later line instead. The run
  itself stops with one line when it next needs the disk (a checkpoint, a metrics line)."""

  refused = None  # the reason, once a write was refused

  def emit(self, record):
    if self.refused is None:
      super().emit(record)

  def handleError(self, record):
    reason = workdir_identity.refused_write(sys.exc_info()[1])
    if reason is None:
      super().handleError(record)
      return
    self.refused = reason
    self.close()

  def close(self):
    try:
      super().close()
    except OSError as e:  # the last flush of a full disk
      if workdir_identity.refused_write(e) is None:
        raise
      self.refused = self.refused or workdir_identity.refused_write(e)


class _LogFile:
  """`workdir/log.txt`: the console lines, appended (never rewritten), on process 0."""

  def __init__(self, workdir: str, enabled: bool):
    self.handler = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self.handler = _LogFileHandler(os.path.join(workdir, "log.txt"), mode="a", encoding="utf-8")
      self.handler.setFormatter(_FORMAT)
      self.handler.addFilter(_Once(console=False))

  def record(self, message: str) -> None:
    """One line in log.txt only (the console gets it from `main`), when the disk still takes it."""
    if self.handler is not None:
      self.handler.handle(logging.LogRecord("mae_jax", logging.ERROR, __file__, 0, message, None, None))

  def __enter__(self):
    if self.handler is not None:
      logging.getLogger().addHandler(self.handler)
    return self

  def __exit__(self, *exc):
    if self.handler is not None:
      logging.getLogger().removeHandler(self.handler)
      self.handler.close()


# ------------------------------------------------------------------------------------ running


def _results_path(job: str, workdir: str) -> str:
  return os.path.join(workdir, "train_done.json" if job == "pretrain" else "results.md")


def _where(job: str, workdir: str) -> str:
  if job == "pretrain":
    return (f"checkpoints in {os.path.join(workdir, 'checkpoints')}, log and metrics in {workdir} "
            f"(tensorboard --logdir {workdir})")
  return f"results in {os.path.join(workdir, 'results.md')} (and results.json)"


COMPLETED = "completed.json"  # the step and the length fields of the last run that finished


def _length(config) -> dict:
  """The fields a resume may change that decide where a run ends (mae_jax/workdir.py: RESUMABLE)."""
  train = config.get("train") or {}
  return json.loads(json.dumps({f"train.{k}": train.get(k) for k in ("total_steps", "epochs")}))


def completed_step(config, workdir: str) -> int | None:
  """The final step of a finished run in `workdir` that `config` would repeat (same identity, the
  same length as the run that finished, results written), else None. A longer run (a raised
  `train.total_steps`, a documented resume change) is not complete: it resumes."""
  from mae_jax import validate
  job = config.get("job", "pretrain")
  saved = os.path.join(workdir, "config.json")
  if not (os.path.exists(saved) and os.path.exists(_results_path(job, workdir))):
    return None
  with open(saved) as f:
    saved = json.load(f)
  current = json.loads(config.to_json_best_effort())
  marker = os.path.join(workdir, COMPLETED)
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if workdir_identity.differences(saved, current) or done.get("length") != _length(config):
      return None
    return int(done["step"])
  if saved != current:  # finished before completed.json existed: only the very same config is done
    return None
  if job == "pretrain":
    with open(_results_path(job, workdir)) as f:
      return int(json.load(f)["step"])
  steps = validate.checkpoint_steps(workdir)
  return steps[-1] if steps else 0


def _record_completion(config, workdir: str, step) -> None:
  """`completed.json` after a run that finished: what a rerun compares its length with."""
  if step is None:
    from mae_jax import validate
    steps = validate.checkpoint_steps(workdir)
    step = steps[-1] if steps else 0
  path = os.path.join(workdir, COMPLETED)
  with open(f"{path}.tmp", "w") as f:
    json.dump({"step": int(step), "length": _length(config)}, f)
  os.replace(f"{path}.tmp", path)


def run(config, workdir: str, *, checked: bool = False) -> dict:
  """Runs `config.job` in `workdir`: the config checks (unless `checked`), then the job, with the
  console lines also in `workdir/log.txt`; a finished run of the same config is not run again."""
  from mae_jax import distributed
  distributed.maybe_initialize()
  import jax
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if config.get("init_from"):  # the workdir's config.json must not depend on where it ran from
    config.init_from = os.path.abspath(os.path.expanduser(config.init_from))
  if not checked:
    check(config)
  # Before anything is written: a config that differs from the workdir's own, or a workdir that
  # init_from reads, stops here with its one or two lines (exit 2).
  workdir_identity.check(config, workdir)
  job = config.get("job", "pretrain")
  done = completed_step(config, workdir)
  if done is not None:
    log.info("already complete at step %d: %s; nothing to do", done, _where(job, workdir))
    return {"step": done, "already_complete": True}
  workdir_identity.check_free_space(workdir)
  from mae_jax.train import workdir_lock
  # The lock first: a second run on a live workdir stops with its one line before it writes a
  # line to the console or to the owner's log.txt (the job takes it again, re-entrantly).
  with workdir_lock.hold(workdir), _LogFile(workdir, jax.process_index() == 0) as log_file:
    log.info("%s in %s (this log also goes to log.txt there)", job, workdir)
    try:
      result = _dispatch(job, config, workdir)
    except Exception as e:  # noqa: BLE001 - re-raised; the one-line reason also goes to log.txt
      stop = _stop_line(e, workdir)
      if stop is not None:
        log_file.record(stop[0])
      raise
    step = result.get("step")
    if result.get("preempted"):
      log.warning("stopped by SIGTERM at step %s: run the same command again to resume", step)
    else:
      if jax.process_index() == 0:
        _record_completion(config, workdir, step)
      log.info("done: %s finished%s; %s", job, f" at step {step}" if step is not None else "",
               _where(job, workdir))
  return result


def _dispatch(job: str, config, workdir: str) -> dict:
  if job == "pretrain":
    from mae_jax.train import pretrain
    return pretrain.train(config, workdir)
  if job in ("finetune", "linear_probe"):
    from mae_jax.train import finetune
    return finetune.run(config, workdir)
  if job == "segment":
    from mae_jax.train import segment
    return segment.run(config, workdir)
  if job == "obs":
    from mae_jax.train import obs
    return obs.run(config, workdir)
  if job == "enhance":
    from mae_jax.train import enhance
    return enhance.run(config, workdir)
  raise ValueError(f"config.job={job!r}: expected pretrain, finetune, linear_probe, segment, obs or enhance")


def main(argv):
  del argv
  _setup_logging()
  from mae_jax import distributed
  distributed.maybe_initialize()
  try:
    config = _CONFIG.value
    if config.get("init_from"):
      config.init_from = os.path.abspath(os.path.expanduser(config.init_from))
    check(config)
  except ValueError as e:
    _reject(e, sys.argv)
  try:
    run(config, _WORKDIR.value, checked=True)
  except Exception as e:  # noqa: BLE001 - one line for the faults the user must act on
    stop = _stop_line(e, _WORKDIR.value)
    if stop is None:
      raise
    print(stop[0], file=sys.stderr, flush=True)
    sys.exit(stop[1])


def _stop_line(e: BaseException, workdir: str) -> tuple[str, int] | None:
  """(the one line, the exit status) for a fault the user must act on: a busy or foreign workdir,
  no readable checkpoint, a failed save (`RunStopped`), or any write the disk refused; else None
  (a bug: its traceback)."""
  from mae_jax.train import workdir_lock
  if isinstance(e, workdir_lock.RunStopped):
    return f"mae_jax: {e}", e.exit_code
  reason = workdir_identity.refused_write(e)
  if reason is None:
    return None
  filename = getattr(e, "filename", None)
  where = filename or "in " + os.path.abspath(os.path.expanduser(workdir or "."))
  return (f"mae_jax: cannot write {where}: {reason}. Free space (or make the workdir writable) and "
          "run the same command again", 1)


def cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
