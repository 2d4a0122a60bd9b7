"""DICOM ultrasound files → 8-bit greyscale views (frames × B-mode regions) for folder datasets.

A file is DICOM when its name ends in ``.dcm``/``.dicom`` or, without an extension, when it carries
the ``DICM`` magic at byte 128 (PS3.10 §7.1). pydicom reads it; the pylibjpeg plugins decode JPEG
baseline, JPEG-lossless and JPEG 2000 pixel data.

Greyscale as a viewer shows it (PS3.3 C.7.6.3.1.2, C.11):
  * ``RGB`` and the ``YBR_*`` interpretations: pydicom returns RGB (it converts YCbCr), then ITU-R
    601 luminance exactly as PIL's ``convert('L')``, the rule used for colour PNG/JPEG files.
  * ``PALETTE COLOR``: the palette lookup table gives RGB (16-bit tables are scaled to 8 bits),
    then luminance.
  * ``MONOCHROME1``/``MONOCHROME2``: the modality LUT (rescale slope/intercept), then the VOI LUT
    or window when the file has one; the result is scaled from the output range to [0, 255].
    8-bit data without a window is kept as stored; deeper data without one is min-max scaled over
    the whole file (all frames share one scale). ``MONOCHROME1`` is inverted (low = white).

Frames: a multi-frame file gives the frames ``frames`` selects: ``"all"``, ``"first"`` or
``"every:K"`` (frames 0, K, 2K, ...). Each view is recorded as (file, frame, region).

Regions: where ``SequenceOfUltrasoundRegions`` is present, every region whose ``RegionDataType``
is 1 (tissue, i.e. B-mode) is cropped to its box ``[MinY0, MaxY1] × [MinX0, MaxX1]`` (inclusive,
PS3.3 C.8.5.5.1) and every other region (Doppler strips, ECG traces, colour bars) is dropped; a
file with two B-mode regions gives two views per frame. The region's ``PhysicalDeltaX/Y`` are kept
as the view's pixel spacing in mm when their units are cm (code 3). Without region tags the whole
frame is one view (the build report says so).

Groups: all views of a file share its group: the ``StudyInstanceUID`` (``group_by="study"``) or
``PatientID`` (``group_by="patient"``). Nothing else of the header leaves this module: the views
carry pixels, frame, region box, spacing and the group id (which the caller hashes).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["DICOM_EXTENSIONS", "is_dicom_name", "has_dicom_magic", "is_dicom_file", "parse_frames",
           "DicomView", "DicomError", "read_dicom"]

DICOM_EXTENSIONS = (".dcm", ".dicom")
_TISSUE = 1  # RegionDataType: tissue (PS3.3 C.8.5.5.1.2)
_CM = 3  # PhysicalUnitsX/YDirection: cm


class DicomError(Exception):
  """A DICOM file that cannot be used; the message is the reason for the build report."""


@dataclass
class DicomView:
  image: np.ndarray  # (H, W) uint8
  frame: int
  region: int  # index in SequenceOfUltrasoundRegions, -1 for the whole frame
  box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), inclusive, in the stored frame
  spacing_mm: tuple[float, float] | None  # (dy, dx): (axial, lateral)


def is_dicom_name(path: pathlib.Path) -> bool:
  return path.suffix.lower() in DICOM_EXTENSIONS


def has_dicom_magic(path: pathlib.Path) -> bool:
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_file(path) -> bool:
  """A ``.dcm``/``.dicom`` name, or no extension and the DICM magic."""
  path = pathlib.Path(path)
  return is_dicom_name(path) or (not path.suffix and has_dicom_magic(path))


def parse_frames(spec: str) -> int | None:
  """``data.dicom_frames`` → the frame stride (1 = all), or None for the first frame only."""
  s = str(spec).strip().lower()
  if s == "all":
    return 1
  if s == "first":
    return None
  if s.startswith("every:"):
    try:
      k = int(s[6:])
    except ValueError:
      k = 0
    if k >= 1:
      return k
  raise ValueError(f"data.dicom_frames={spec!r}: expected 'all', 'first' or 'every:K' with K >= 1")


def _read(path: pathlib.Path, *, header_only: bool = False):
  import pydicom
  from pydicom.errors import InvalidDicomError

  try:
    return pydicom.dcmread(path, stop_before_pixels=header_only)
  except InvalidDicomError as e:
    raise DicomError(f"not a readable DICOM file: {e}") from None
  except Exception as e:  # noqa: BLE001 - any parser failure means "skip this file"
    raise DicomError(f"cannot read DICOM: {type(e).__name__}: {e}") from None


GROUP_TAGS = {"study": "StudyInstanceUID", "patient": "PatientID"}


def _group_id(ds, group_by: str) -> str | None:
  """The file's StudyInstanceUID or PatientID (None when the tag is missing or empty)."""
  v = ds.get(GROUP_TAGS[group_by])
  return (str(v).strip() or None) if v is not None else None


def _frame_indices(ds, stride: int | None) -> list[int]:
  n = int(ds.get("NumberOfFrames", 1) or 1)
  return [0] if stride is None else list(range(0, n, stride))


def _regions(ds, shape: tuple[int, int]) -> list[tuple[int, tuple, tuple | None]]:
  out = []
  h, w = shape
  for k, r in enumerate(ds.get("SequenceOfUltrasoundRegions", []) or []):
    if int(r.get("RegionDataType", -1)) != _TISSUE:
      continue
    try:
      x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
      x1, y1 = int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)
    except AttributeError:
      continue
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w - 1, x1), min(h - 1, y1)
    if x1 < x0 or y1 < y0:
      continue
    spacing = None
    if int(r.get("PhysicalUnitsXDirection", 0)) == _CM and int(r.get("PhysicalUnitsYDirection", 0)) == _CM:
      dx, dy = float(r.get("PhysicalDeltaX", 0) or 0), float(r.get("PhysicalDeltaY", 0) or 0)
      if dx > 0 and dy > 0:
        spacing = (abs(dy) * 10.0, abs(dx) * 10.0)
    out.append((k, (x0, y0, x1, y1), spacing))
  return out


def _luminance(rgb: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").convert("L"), np.uint8)


class _Grey:
  """Per-file conversion of decoded frames to 8-bit greyscale (see the module docstring)."""

  def __init__(self, ds):
    self.ds = ds
    self.pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    self.bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    self.windowed = ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds
    self.range: tuple[float, float] | None = None  # min-max of the whole file, set on demand

  def note(self) -> str:
    if self.pi in ("RGB",) or self.pi.startswith("YBR"):
      return f"DICOM {self.pi}: luminance (ITU-R 601)"
    if self.pi == "PALETTE COLOR":
      return "DICOM PALETTE COLOR: palette lookup, luminance (ITU-R 601)"
    how = "VOI LUT/window" if self.windowed else ("as stored" if self.bits <= 8 else "min-max over the file")
    inverted = ", inverted" if self.pi == "MONOCHROME1" else ""
    return f"DICOM {self.pi or 'MONOCHROME2'} {self.bits}-bit: {how}{inverted}"

  def __call__(self, a: np.ndarray, all_frames) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if self.pi == "PALETTE COLOR":
      rgb = apply_color_lut(a, self.ds)
      if rgb.dtype != np.uint8:
        rgb = np.round(rgb.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)
      return _luminance(rgb)
    if a.ndim == 3 and a.shape[-1] == 3:
      return _luminance(a.astype(np.uint8) if a.dtype != np.uint8 else a)
    if a.ndim != 2:
      raise DicomError(f"unsupported pixel layout {a.shape} ({self.pi})")
    if self.windowed:
      v = apply_voi_lut(apply_modality_lut(a, self.ds), self.ds).astype(np.float64)
      lo, hi = (0.0, 2.0**self.bits - 1) if int(self.ds.get("PixelRepresentation", 0)) == 0 else (
          -(2.0 ** (self.bits - 1)), 2.0 ** (self.bits - 1) - 1)
      out = (v - lo) / (hi - lo) * 255.0
    elif self.bits <= 8 and a.dtype == np.uint8:
      out = a.astype(np.float64)
    else:
      if self.range is None:
        vals = [apply_modality_lut(f, self.ds).astype(np.float64) for f in all_frames()]
        self.range = (min(float(x.min()) for x in vals), max(float(x.max()) for x in vals))
      lo, hi = self.range
      v = apply_modality_lut(a, self.ds).astype(np.float64)
      out = (v - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(v)
    out = np.round(out).clip(0, 255)
    if self.pi == "MONOCHROME1":
      out = 255.0 - out
    return out.astype(np.uint8)


def read_dicom(path, *, frames: int | None = 1, min_size: int = 1, group_by: str = "study",
               only: set[tuple[int, int]] | None = None) -> tuple[list[DicomView], list[str], str | None]:
  """The views of one DICOM file, the notes for the build report and its group id (the tag
  ``group_by`` names, None when the file lacks it).

  ``frames``: a stride from :func:`parse_frames`. ``only``: the (frame, region) pairs to decode
  (a build's second pass); views smaller than ``min_size`` on a side are dropped with a note.
  Raises :class:`DicomError` when the file has no pixel data or cannot be decoded."""
  from pydicom.pixels import pixel_array

  path = pathlib.Path(path)
  ds = _read(path)
  if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
    raise DicomError("DICOM file without pixel data")
  rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
  idx = _frame_indices(ds, frames)
  n = int(ds.get("NumberOfFrames", 1) or 1)
  grey = _Grey(ds)
  notes = [grey.note()]
  if n > 1:
    notes.append(f"{n} frames: {len(idx)} used" + (" (first)" if frames is None else f" (every {frames})"))
  regions = _regions(ds, (rows, cols))
  if regions:
    dropped = len(ds.SequenceOfUltrasoundRegions) - len(regions)
    notes.append(f"{len(regions)} B-mode region(s) cropped"
                 + (f", {dropped} other region(s) dropped" if dropped else ""))
  else:
    notes.append("no ultrasound region tags: whole frame used")

  def decode(i: int) -> np.ndarray:
    try:
      return pixel_array(ds, index=i if n > 1 else None)
    except Exception as e:  # noqa: BLE001 - a missing decoder or damaged pixel data
      raise DicomError(f"cannot decode frame {i}: {type(e).__name__}: {e}") from None

  views: list[DicomView] = []
  small = 0
  for i in idx:
    if only is not None and not any(f == i for f, _ in only):
      continue
    g = grey(decode(i), lambda: (decode(j) for j in range(n)))
    if g.shape != (rows, cols):
      raise DicomError(f"frame {i} decodes to {g.shape}, the header says {rows}x{cols}")
    parts = [(k, (x0, y0, x1, y1), sp, g[y0:y1 + 1, x0:x1 + 1]) for k, (x0, y0, x1, y1), sp in regions] or [
        (-1, None, None, g)]
    for k, box, sp, img in parts:
      if only is not None and (i, k) not in only:
        continue
      if min(img.shape) < min_size:
        small += 1
        continue
      views.append(DicomView(np.ascontiguousarray(img), i, k, box, sp))
  if small:
    notes.append(f"{small} view(s) below min_size={min_size} dropped")
  if not views and only is None:
    raise DicomError("no view left (every region or frame below min_size)")
  return views, notes, _group_id(ds, group_by)
