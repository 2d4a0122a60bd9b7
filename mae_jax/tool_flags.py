"""absl flags for the command-line tools beside `mae_jax.main` (export, import_weights, the benchmarks).

Each tool defines its flags on its own `flags.FlagValues`, not on absl's global `FLAGS`: the tools
share flag names (--workdir, --json, --batch, --image_size) and the tests import several of them
in one process, where global definitions would collide. `parse` reads a command line into a tool's
flags for an in-process call (tests, notebooks); `run` is the program entry: the tool's flags join
`FLAGS` and `absl.app.run` parses them, so every tool has absl's --help, --helpfull and logging
flags as `python -m mae_jax.main` has them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import app, flags


def parse(fv: flags.FlagValues, argv: Sequence[str], prog: str) -> None:
  """Parses `argv` (without the program name) into `fv`, every flag starting from its default so
  that an earlier in-process call's values do not carry over. A mistake (an unknown flag, a value
  of the wrong type, a required flag missing, a positional argument) raises SystemExit naming it."""
  fv.unparse_flags()
  try:
    rest = fv([prog, *argv])[1:]
  except flags.Error as e:
    raise SystemExit(f"{prog}: {e}") from None
  if rest:
    raise SystemExit(f"{prog}: unexpected arguments {' '.join(rest)!r} (flags are --name=value)")


def run(fv: flags.FlagValues, main: Callable[[], object]) -> None:
  """`absl.app.run` with `fv`'s flags: `main()` runs once they are parsed. Its return value is
  dropped (app.run would make it the exit status)."""
  flags.FLAGS.append_flag_values(fv)
  for module, defined in fv.flags_by_module_dict().items():  # --help lists them under their module
    for flag in defined:
      flags.FLAGS.register_flag_by_module(module, flag)

  def app_main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])!r} (flags are --name=value)")
    fv.mark_as_parsed()  # the Flag objects are shared with FLAGS, which app.run has just parsed
    main()

  app.run(app_main)
