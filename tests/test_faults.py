"""Fault injection (issue 19): each case runs pretraining on the smoke config in a subprocess, injects
one fault, and asserts what the job does (docs/reliability.md lists them all).

One uninterrupted reference run (12 steps, a checkpoint every 3, the last two kept) is what every
resumed run must equal bit for bit. Faults inside a save are injected at exact points by wrapping
orbax's rename of the temporary directory (`INJECT` below), so the kill always lands where it is
meant to; test_resume.py covers a kill at a random moment after a checkpoint.

A full disk is a 3 MiB tmpfs and a read-only workdir a tmpfs remounted read-only where this
process may mount (root in CI's container); otherwise the same write errors are injected (`enospc`)
or the workdir's permissions removed (non-root), and the test says which in its output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mae_jax.train import checkpoint, loop
from tests import train_helpers as H

N, EVERY = 12, 3
ARGS = (*H.FAST, f"--config.train.total_steps={N}", f"--config.train.checkpoint_every={EVERY}",
        "--config.train.keep_checkpoints=2")
KEYS = ("loss", "grad_norm", "lr", "mask_fraction")
FAULT_ENV = "MAE_JAX_TEST_FAULT"

# Runs mae_jax.main with one fault armed by $MAE_JAX_TEST_FAULT = KIND:ARG:
#   before_rename:P / after_rename:P  SIGKILL just before / after orbax renames a temporary
#                                     directory into the path ending in P (e.g. "9" commits step 9;
#                                     "9.orbax-checkpoint-tmp/state" finalizes its state item)
#   enospc:P                          that rename fails with ENOSPC instead (a full disk)
#   erofs:                            the workdir's lock file cannot be opened: read-only file system
#   torn_line:S                       SIGKILL half-way through writing step S's metrics line
#   pause:S,PATH                      before step S's metrics line, wait until PATH exists
INJECT = r"""
import asyncio, errno, os, signal, sys, time
kind, _, arg = os.environ.get("MAE_JAX_TEST_FAULT", "").partition(":")

def die():
  os.kill(os.getpid(), signal.SIGKILL)

if kind in ("before_rename", "after_rename", "enospc"):
  from orbax.checkpoint._src.path import async_path
  rename = async_path.rename
  async def patched(src, dst):
    hit = str(dst).endswith("/" + arg)
    if hit and kind == "before_rename":
      die()
    if hit and kind == "enospc":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    await rename(src, dst)
    if hit and kind == "after_rename":
      die()
  async_path.rename = patched
elif kind == "erofs":
  from mae_jax.train import workdir_lock
  def refuse(path, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
  workdir_lock.open = refuse
elif kind in ("torn_line", "pause"):
  from mae_jax.train import loop
  write = loop.MetricsLog.write
  step, _, path = arg.partition(",")
  def patched(self, s, metrics):
    if s == int(step) and kind == "torn_line":
      self._f.write('{"step": %d, "loss": 1.' % s)
      self._f.flush()
      die()
    if s == int(step) and kind == "pause":
      open(path + ".waiting", "w").close()
      while not os.path.exists(path):
        time.sleep(0.05)
    write(self, s, metrics)
  loop.MetricsLog.write = patched
from absl import app
from mae_jax import main
app.run(main.main)
"""


def faulty_cli(workdir, *overrides) -> list[str]:
  return [sys.executable, "-c", INJECT, H.SMOKE, f"--workdir={workdir}", *overrides]


@contextlib.contextmanager
def armed(fault: str):
  """$MAE_JAX_TEST_FAULT set for the subprocesses started inside (H.env copies os.environ)."""
  os.environ[FAULT_ENV] = fault
  try:
    yield
  finally:
    del os.environ[FAULT_ENV]


def start_with_fault(fault: str, workdir, log_path) -> subprocess.Popen:
  with armed(fault):
    return H.start(faulty_cli(workdir, *ARGS), log_path)


def run_with_fault(fault: str, workdir, log_path) -> tuple[int, str]:
  with armed(fault):
    return H.run(faulty_cli(workdir, *ARGS), log_path)


def by_step(workdir) -> dict:
  records = loop.read_metrics(str(workdir))
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), f"metrics.jsonl must hold each step once, in order: {steps}"
  return {r["step"]: r for r in records}


def assert_equals_reference(workdir, ref, steps=range(1, N + 1)):
  """Every logged step of `workdir` and the final parameters equal the reference run's, bitwise."""
  got, want = by_step(workdir), by_step(ref)
  assert sorted(got) == list(range(1, N + 1))
  for s in steps:
    for k in KEYS:
      assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])
  (ref_step, ref_params), (step, params) = checkpoint.restore_params(str(ref)), checkpoint.restore_params(str(workdir))
  assert ref_step == step == N
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_quiet(out: str):
  """No traceback, and none of the asyncio / orbax background spam the issue found."""
  for noise in ("Traceback", "Event loop is closed", "exception was never retrieved", "_SignalingThread"):
    assert noise not in out, out[-3000:]


def last_line(out: str) -> str:
  return out.strip().splitlines()[-1]


def discarded(workdir) -> list[str]:
  path = pathlib.Path(workdir) / "metrics.discarded.jsonl"
  return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run, during which a second run on its workdir is refused (two runs, one
  workdir: the reference pauses before step 5's line until the intruder has exited)."""
  H.build_smoke_dataset()
  tmp = tmp_path_factory.mktemp("faults_ref")
  ref_dir, gate = tmp / "ref", tmp / "go"
  ref = start_with_fault(f"pause:5,{gate}", ref_dir, tmp / "ref.log")
  try:
    H.wait_for(lambda: os.path.exists(f"{gate}.waiting"), ref, tmp / "ref.log", "the reference at step 5")
    rc_b, out_b = H.run(H.cli(ref_dir, *ARGS), tmp / "intruder.log")
    gate.touch()
    assert ref.wait(timeout=300) == 0, H.read(tmp / "ref.log")
  finally:
    if ref.poll() is None:
      ref.kill()
      ref.wait()
  return {"dir": ref_dir, "pid": ref.pid, "intruder": (rc_b, out_b), "log": H.read(tmp / "ref.log")}


def copy_run(reference, dest) -> pathlib.Path:
  """The reference workdir as a run stopped after its last checkpoint and before it finished
  (without train_done.json; else the rerun is "already complete" and restores nothing)."""
  shutil.copytree(reference["dir"], dest, symlinks=True)
  (pathlib.Path(dest) / "train_done.json").unlink()
  return pathlib.Path(dest)


# --------------------------------------------------------------------------------- ownership


def test_second_run_on_a_live_workdir_exits_2_naming_the_owner(reference):
  """Expected: the intruder exits 2 with one line naming the owner's pid; the owner finishes with
  every metrics line (none lost, none rewritten) and its checkpoints only."""
  rc, out = reference["intruder"]
  assert rc == 2, out
  assert out.strip().count("\n") == 0, out
  assert out.startswith(f"mae_jax: workdir {reference['dir']} is in use by another run "
                        f"(pid {reference['pid']} on host "), out
  assert sorted(by_step(reference["dir"])) == list(range(1, N + 1))
  assert H.committed_steps(reference["dir"]) == [9, 12]
  assert not discarded(reference["dir"])
  # A clean exit leaves the lock file empty: the next run has no stale owner to report.
  assert (reference["dir"] / ".lock").read_text() == ""


def test_lock_is_exclusive_across_processes_and_stale_locks_are_taken_over(tmp_path, caplog):
  """Expected: while one process holds the lock another gets WorkdirBusy naming it; once that
  process is killed the lock is free and its leftover owner is reported as gone."""
  from mae_jax.train import workdir_lock
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from mae_jax.train import workdir_lock\n"
       "with workdir_lock.hold(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)", str(tmp_path)],
      stdout=subprocess.PIPE, env=H.env(), cwd=H.REPO, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid} on host "):
      with workdir_lock.hold(tmp_path):
        pass
  finally:
    holder.kill()
    holder.wait()
  with caplog.at_level("WARNING", logger="mae_jax"):
    with workdir_lock.hold(tmp_path):
      with workdir_lock.hold(tmp_path):  # re-entrant within a process
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert f"taking over the lock of a run that is gone (pid {holder.pid} on host" in caplog.text


# ------------------------------------------------------------------------------------ kills


@pytest.mark.parametrize("fault, resumes_from", [
    ("torn_line:7", None),  # between checkpoints, half-way through a metrics line (3 or 6 committed)
    ("before_rename:9.orbax-checkpoint-tmp/state", 6),  # during a save: arrays written, not finalized
    ("before_rename:9", 6),  # during a save: every item final, the step not committed
    ("after_rename:9", 9),  # step 9 committed, step 3 not yet deleted
])
def test_sigkill_anywhere_then_restart_equals_the_uninterrupted_run(reference, tmp_path, fault,
                                                                    resumes_from):
  """Expected: the killed run's restart resumes from the newest committed checkpoint, takes over
  the dead run's lock, moves the lines it had logged past that step to metrics.discarded.jsonl, and
  ends with losses and parameters bitwise equal to the reference."""
  run_dir = tmp_path / "run"
  rc, out = run_with_fault(fault, run_dir, tmp_path / "victim.log")
  assert rc == -9, out
  logged = sorted(r["step"] for r in loop.read_metrics(str(run_dir)))
  committed = max(H.committed_steps(run_dir))
  assert committed == (resumes_from or committed)
  resumes_from = committed
  rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "restart.log")
  assert rc == 0, out
  assert "taking over the lock of a run that is gone" in out
  assert f"resumed from the checkpoint at step {resumes_from}" in out
  assert_quiet(out)
  moved = [json.loads(x) for x in discarded(run_dir)[1:] if x.startswith('{"step"') and x.endswith("}")]
  assert [r["step"] for r in moved] == [s for s in logged if s > resumes_from]
  if fault.startswith("torn_line"):
    assert discarded(run_dir)[-1] == '{"step": 7, "loss": 1.'  # the torn line, kept as it was
  assert not list((run_dir / "checkpoints").glob("*tmp*"))
  assert_equals_reference(run_dir, reference["dir"])


# --------------------------------------------------------------------------- damaged checkpoints


def _data_files(step_dir):
  files = [p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  return files


def corrupt(step_dir):
  for p in _data_files(step_dir):
    p.write_bytes(np.random.default_rng(0).integers(0, 256, p.stat().st_size, np.uint8).tobytes())


def truncate(step_dir):
  for p in _data_files(step_dir):
    os.truncate(p, p.stat().st_size // 2)


def delete(step_dir):
  for p in _data_files(step_dir):
    p.unlink()


def bitflip(step_dir):
  """One bit in the middle of the biggest data file: zstd without a content checksum mostly
  decodes it to a different array (issue 27.3), which only the checkpoint's checksums catch."""
  p = max(_data_files(step_dir), key=lambda f: f.stat().st_size)
  data = bytearray(p.read_bytes())
  data[len(data) // 2] ^= 0x08
  p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [corrupt, truncate, delete, bitflip], ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restored(reference, tmp_path,
                                                                               damage):
  """Expected: one warning line names checkpoint 12 and why, it moves to checkpoints/bad-12, the
  run resumes from 9 without a traceback and ends equal to the reference."""
  run_dir = copy_run(reference, tmp_path / "run")
  damage(run_dir / "checkpoints" / "12")
  rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "restart.log")
  assert rc == 0, out
  warning = [ln for ln in out.splitlines() if "is unreadable" in ln]
  assert len(warning) == 1 and f"checkpoint 12 in {run_dir}/checkpoints is unreadable (" in warning[0], out
  assert warning[0].endswith("moved aside to bad-12; trying the one before it")
  assert "resumed from the checkpoint at step 9" in out
  assert_quiet(out)
  assert (run_dir / "checkpoints" / "bad-12").is_dir()
  assert [json.loads(x)["step"] for x in discarded(run_dir)[1:]] == [10, 11, 12]
  assert_equals_reference(run_dir, reference["dir"])


def test_no_readable_checkpoint_exits_2_in_one_line(reference, tmp_path):
  """Expected: both checkpoints damaged -> each set aside with a warning, then exit 2 with one
  line and no traceback; nothing is deleted."""
  run_dir = copy_run(reference, tmp_path / "run")
  corrupt(run_dir / "checkpoints" / "12")
  truncate(run_dir / "checkpoints" / "9")
  rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "restart.log")
  assert rc == 2, out
  assert last_line(out).startswith(f"mae_jax: no readable checkpoint in {run_dir}/checkpoints: "
                                   "step(s) 12, 9 were unreadable"), out
  assert_quiet(out)
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["bad-12", "bad-9"]


def test_config_mismatch_is_an_error_not_damage(reference, tmp_path):
  """Expected: a changed model in a used workdir stops at once (exit 2, the workdir's config.json
  names the field); without config.json, a checkpoint whose shapes differ from the config is never
  moved aside: the run fails and checkpoint 12 stays where it was."""
  run_dir = copy_run(reference, tmp_path / "run")
  before = (run_dir / "config.json").read_bytes()
  rc, out = H.run(H.cli(run_dir, *ARGS, "--config.model.decoder_width=48"), tmp_path / "identity.log")
  assert rc == 2 and out.startswith(f"mae_jax: {run_dir} holds a run of another config: it differs in "
                                    "model.decoder_width (32 there, 48 now)."), out
  assert (run_dir / "config.json").read_bytes() == before
  (run_dir / "config.json").unlink()
  rc, out = H.run(H.cli(run_dir, *ARGS, "--config.model.decoder_width=48"), tmp_path / "mismatch.log")
  assert rc != 0 and "is not compatible with the stored shape" in out, out
  assert H.committed_steps(run_dir) == [9, 12]
  assert not list((run_dir / "checkpoints").glob("bad-*"))


# ----------------------------------------------------------------------- full / read-only disk


@contextlib.contextmanager
def tmpfs(path, size: str):
  """A tmpfs of `size` at `path`, or None where this process may not mount one."""
  path.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                     capture_output=True)
  if r.returncode != 0:
    yield None
    return
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path, leave: int):
  """Fills the file system of `path` up to `leave` free bytes."""
  st = os.statvfs(path)
  with open(path / "filler", "wb") as f:
    f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))


def test_full_disk_stops_with_one_line_and_the_next_run_resumes(reference, tmp_path):
  """Expected: the save of step 12 fails -> exit 1 with one line naming the step, the reason and
  the intact step 9; no traceback; step 9 untouched; once space is free the same command resumes
  from 9 and ends equal to the reference."""
  with tmpfs(tmp_path / "disk", "3m") as disk:
    base = disk or tmp_path
    run_dir = copy_run(reference, base / "run")
    shutil.rmtree(run_dir / "checkpoints" / "12")
    if disk is not None:
      print("full disk: a 3 MiB tmpfs filled to 256 KiB free")
      fill(disk, 256 * 1024)
      rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "full.log")
    else:
      print("full disk: tmpfs not allowed here; ENOSPC injected into orbax's commit of step 12")
      rc, out = run_with_fault("enospc:12", run_dir, tmp_path / "full.log")
    assert rc == 1, out
    # On the tmpfs the save is refused before orbax writes (it needs more than is free); the
    # injected fault fails orbax's own commit.
    needs = r" \(the checkpoint needs 1\.\d MiB, 0\.2 MiB free\)" if disk is not None else ""
    assert re.fullmatch(
        rf"mae_jax: saving the checkpoint at step 12 in {re.escape(str(run_dir))}/checkpoints failed: "
        rf"No space left on device{needs}; the newest intact checkpoint is step 9\. Free space \(or "
        r"make the workdir writable\) and run the same command again to resume from it",
        last_line(out)), out
    assert_quiet(out)
    # The reason is in log.txt too, where the disk still took the line.
    assert (run_dir / "log.txt").read_text().splitlines()[-1].endswith(last_line(out))
    assert H.committed_steps(run_dir) == [9]
    assert checkpoint.restore_params(str(run_dir))[0] == 9
    if disk is not None:
      (disk / "filler").unlink()
    rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "resume.log")
    assert rc == 0, out
    assert "resumed from the checkpoint at step 9" in out
    assert_equals_reference(run_dir, reference["dir"])


def test_nearly_full_disk_at_start_stops_with_one_line(tmp_path):
  """Issue 27.5, was: 152 stdout + 871 stderr lines ('--- Logging error ---', shutdown tracebacks).
  Expected: with less than 128 KiB free, exit 1 with one line saying how much is free; nothing
  written."""
  with tmpfs(tmp_path / "disk", "2m") as disk:
    base = disk or tmp_path
    if disk is not None:
      print("nearly full disk: a 2 MiB tmpfs filled to 16 KiB free")
      fill(disk, 16 * 1024)
      rc, out = H.run(H.cli(base / "run", *ARGS), tmp_path / "full.log")
    else:
      print("nearly full disk: tmpfs not allowed here; the threshold raised above the free space")
      code = ("import sys; from mae_jax import workdir; workdir.MIN_FREE_BYTES = 1 << 62; "
              "from mae_jax import main; sys.argv = sys.argv[1:]; main.cli()")
      rc, out = H.run([sys.executable, "-c", code, *H.cli(base / "run", *ARGS)[2:]], tmp_path / "full.log")
    assert rc == 1, out
    assert re.fullmatch(rf"mae_jax: only \d+ KiB free on the disk of {base}/run \(a run needs 128 KiB to "
                        r"start, its checkpoints more\)\. Free space and run the same command again", out.strip()), out
    assert not (base / "run").exists()


def test_refused_writes_at_start_stop_with_one_line_and_no_logging_errors(tmp_path):
  """Writes the disk refuses once the run has started (config.json and log.txt on a device that is
  always full, /dev/full): exit 1 with one line naming the file and the reason, no '--- Logging
  error ---' traceback for the log lines log.txt could not take, no temporary file left."""
  H.build_smoke_dataset()
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "log.txt").symlink_to("/dev/full")
  (run_dir / "config.json.tmp").symlink_to("/dev/full")
  rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "full.log")
  assert rc == 1, out
  assert last_line(out) == (f"mae_jax: cannot write in {run_dir}: No space left on device. Free space "
                            "(or make the workdir writable) and run the same command again"), out
  assert "Logging error" not in out and len(out.splitlines()) <= 4, out
  assert_quiet(out)
  assert not (run_dir / "config.json.tmp").exists() and not (run_dir / "config.json").exists()


def test_read_only_workdir_exits_2_in_one_line_and_changes_nothing(reference, tmp_path):
  """Expected: exit 2 with one line saying the workdir cannot take the lock file and why; every
  file of the workdir unchanged."""
  with tmpfs(tmp_path / "disk", "4m") as disk:
    run_dir = copy_run(reference, (disk or tmp_path) / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    if disk is not None:
      print("read-only workdir: tmpfs remounted read-only")
      subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    elif os.geteuid() != 0:
      print("read-only workdir: write permission removed (not root)")
      for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    else:
      print("read-only workdir: root without mount; EROFS injected where the lock file is opened")
    if disk is None and os.geteuid() == 0:
      rc, out = run_with_fault("erofs:", run_dir, tmp_path / "ro.log")
    else:
      rc, out = H.run(H.cli(run_dir, *ARGS), tmp_path / "ro.log")
    assert rc == 2, out
    assert out.strip().count("\n") == 0, out
    assert out.startswith(f"mae_jax: cannot create the lock file {run_dir}/.lock: "), out
    assert ("Permission denied" if disk is None and os.geteuid() != 0 else "Read-only file system") in out
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------- hostile image folders
# tests/test_folder.py::test_pretrain_with_broken_files already covers a truncated PNG, a 0-byte
# file, 16-bit, RGBA, a multi-frame TIFF and text named .png; these are the rest of issue 19's list.


def _noise(seed, h=40, w=36):
  return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _png_of_zeros(path, width: int, height: int) -> None:
  """A valid 8-bit grayscale PNG of `width` x `height` zeros, written as a stream (never held in
  memory: 20000 x 20000 is 400 MB decoded, 0.4 MB on disk)."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  z, row, idat = zlib.compressobj(1), b"\0" * (width + 1), []
  for _ in range(height):
    idat.append(z.compress(row))
  idat.append(z.flush())
  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat))
                   + chunk(b"IEND", b""))


def hostile_folder(root: pathlib.Path) -> pathlib.Path:
  """Two good classes of 4 images each, plus one of every hostile entry."""
  from PIL import Image
  for k, c in enumerate(("benign", "malignant")):
    (root / c).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(_noise(10 * k + i)).save(root / c / f"{i}.png")
  (root / "benign" / "text.jpg").write_text("this is not a JPEG")
  _png_of_zeros(root / "benign" / "huge.png", 20000, 20000)
  os.symlink("loop_b.png", root / "benign" / "loop_a.png")  # a file link loop
  os.symlink("loop_a.png", root / "benign" / "loop_b.png")
  os.symlink("..", root / "malignant" / "up")  # a folder link loop
  Image.fromarray(_noise(50)).save(root / "malignant" / "unreadable.png")
  os.chmod(root / "malignant" / "unreadable.png", 0)
  with open(os.fsencode(root / "malignant") + b"/caf\xe9_\xff.png", "wb") as f:  # latin-1 bytes
    Image.fromarray(_noise(60)).save(f, format="PNG")
  (root / "empty_class").mkdir()
  (root / "single").mkdir()
  Image.fromarray(_noise(70)).save(root / "single" / "only.png")
  return root


def test_hostile_folder_builds_with_every_bad_file_reported(tmp_path, monkeypatch, caplog):
  """Expected, per entry: text named .jpg -> skipped, not an image; 20000x20000 PNG -> skipped by
  the decompression-bomb guard without decoding; file symlink loop -> skipped, cannot stat; folder
  symlink loop -> not entered; unreadable file -> skipped, cannot open (root reads everything, so
  the permission error is also injected); non-UTF-8 name -> a normal record, logged escaped; empty
  class folder -> not a class, warned; class with one image -> train only, warned."""
  from mae_jax.data import folder
  from PIL import Image
  root = hostile_folder(tmp_path / "raw")
  unreadable = str(root / "malignant" / "unreadable.png")
  open_image = Image.open

  def refuse_unreadable(path, *args, **kwargs):
    if str(path) == unreadable:
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), unreadable)
    return open_image(path, *args, **kwargs)

  monkeypatch.setattr(folder.Image, "open", refuse_unreadable)
  with caplog.at_level("INFO", logger="mae_jax"):
    out = folder.build_folder_dataset(root, tmp_path / "ds", task="classify")
  report = json.loads((out / "build_report.json").read_text())
  skipped = {d["path"]: d["reason"] for d in report["skipped"]}
  assert skipped.pop("benign/text.jpg") == "not a readable image (PIL cannot identify the format)"
  assert skipped.pop("benign/huge.png").startswith("too large to decode (decompression-bomb guard)")
  for link in ("benign/loop_a.png", "benign/loop_b.png"):
    assert "Too many levels of symbolic links" in skipped.pop(link)
  assert skipped.pop("malignant/unreadable.png") == (
      f"cannot open: PermissionError: [Errno 13] Permission denied: '{unreadable}'")
  assert skipped == {}
  assert report["warnings"] == ["folder empty_class/ holds no usable image: it is not a class",
                                "class single has 1 usable image(s): none in validation, test"]
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["classes"] == ["benign", "malignant", "single"]
  assert meta["counts_per_group"]["train"]["single"] == 1
  assert sum(meta["counts"].values()) == 4 + 5 + 1  # the latin-1 name is a normal image
  paths = [p for s in folder.SPLITS for p in folder.folder_source(out, s).paths]
  assert "malignant/caf\udce9_\udcff.png" in paths  # the name as os.listdir gives it
  assert "dataset folder" in caplog.text and "5 files skipped" in caplog.text
  assert "holds no usable image" in caplog.text


def test_pretraining_on_a_hostile_folder_runs(tmp_path):
  """Expected: the smoke pretraining on the hostile folder (organ layout) converts it, logs the
  summary and the warnings, and trains to the end (exit 0) on the usable images only."""
  root = hostile_folder(tmp_path / "raw")
  rc, out = H.run(H.cli(tmp_path / "run", *H.FAST, "--config.train.total_steps=2",
                        "--config.data.name=folder", f"--config.data.folder={root}",
                        f"--config.data.data_dir={tmp_path / 'cache'}"), tmp_path / "folder.log")
  assert rc == 0, out
  skipped = 4 if os.geteuid() == 0 else 5  # root reads the unreadable file
  assert f"{skipped} files skipped" in out, out
  assert "folder empty_class/ holds no usable image: it is not an organ" in out
  assert "Traceback" not in out and "Logging error" not in out
  assert sorted(by_step(tmp_path / "run")) == [1, 2]
