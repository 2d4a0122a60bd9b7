"""Reading one image or mask file of a folder dataset as 8-bit greyscale (the record format: ``records``).

The conversion rules are listed in ``folder``'s docstring; DICOM files go through ``dicom``.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

class _Skip(Exception):
  """A file that cannot be used; the message is the reason written to the report."""


# --------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------


def _open_first_frame(path: pathlib.Path) -> tuple[Image.Image, list[str]]:
  notes: list[str] = []
  try:
    size = path.stat().st_size
  except OSError as e:
    raise _Skip(f"cannot stat: {e}") from None
  if size == 0:
    raise _Skip("empty file (0 bytes)")
  try:
    im = Image.open(path)
  except UnidentifiedImageError:
    raise _Skip("not a readable image (PIL cannot identify the format)") from None
  except Image.DecompressionBombError as e:
    raise _Skip(f"too large to decode (decompression-bomb guard): {e}") from None
  except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
    raise _Skip(f"cannot open: {type(e).__name__}: {e}") from None
  # PIL only refuses images over twice its limit; between one and two times it warns and decodes
  # (a 12000x12000 header costs 144 MB per decode, and pass 2 decodes again): refuse those too.
  w, h = im.size
  if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
    im.close()
    raise _Skip(f"too large to decode (decompression-bomb guard): {w}x{h} = {w * h} pixels, over "
                f"PIL's limit of {Image.MAX_IMAGE_PIXELS} (Image.MAX_IMAGE_PIXELS)")
  try:
    frames = int(getattr(im, "n_frames", 1))
    if frames > 1:
      im.seek(0)
      notes.append(f"multi-frame ({frames} frames): first frame used")
    im.load()
  except Exception as e:  # noqa: BLE001
    im.close()
    raise _Skip(f"truncated or corrupt image: {type(e).__name__}: {e}") from None
  return im, notes


def _image_to_gray8(im: Image.Image) -> tuple[np.ndarray, list[str]]:
  mode = im.mode
  if mode == "L":
    return np.asarray(im, dtype=np.uint8), []
  if mode.startswith("I;16") or mode in ("I", "F"):
    a = np.asarray(im).astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    kind = {"I": "32-bit integer", "F": "floating-point"}.get(mode, "16-bit")
    if hi > lo:
      out = np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
    else:
      out = np.zeros(a.shape, np.uint8)
    return out, [f"{kind} ({mode}): min-max scaled from [{lo:g}, {hi:g}] to [0, 255]"]
  if mode == "1":
    return np.asarray(im.convert("L"), dtype=np.uint8), ["1-bit: mapped to {0, 255}"]
  if mode in ("LA", "La"):
    return np.asarray(im.getchannel(0), dtype=np.uint8), [f"{mode}: alpha channel dropped"]
  if mode in ("P", "PA"):
    has_alpha = mode == "PA" or "transparency" in im.info
    rgb = im.convert("RGBA").convert("RGB") if has_alpha else im.convert("RGB")
    note = "palette with transparency: alpha dropped, luminance" if has_alpha else "palette: luminance"
    return np.asarray(rgb.convert("L"), dtype=np.uint8), [note + " (ITU-R 601)"]
  if mode in ("RGBA", "RGBa"):
    return (np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8),
            [f"{mode}: alpha channel dropped, luminance (ITU-R 601)"])
  try:
    rgb = im if mode == "RGB" else im.convert("RGB")
    return np.asarray(rgb.convert("L"), dtype=np.uint8), [f"{mode}: luminance (ITU-R 601)"]
  except Exception as e:  # noqa: BLE001
    raise _Skip(f"unsupported image mode {mode}: {e}") from None


def _mask_to_values(im: Image.Image) -> tuple[np.ndarray, list[str]]:
  mode = im.mode
  if mode in ("L", "P") or mode.startswith("I"):
    a = np.asarray(im)
    return a.astype(np.int64), []
  if mode == "1":
    return np.asarray(im.convert("L")).astype(np.int64), []
  if mode in ("LA", "La", "PA"):
    return np.asarray(im.getchannel(0)).astype(np.int64), [f"mask {mode}: alpha dropped"]
  if mode == "F":
    a = np.asarray(im)
    if not np.all(np.mod(a, 1) == 0):
      raise _Skip("floating-point mask with non-integer values")
    return a.astype(np.int64), []
  rgb = im.convert("RGB") if mode != "RGB" else im
  return np.asarray(rgb.convert("L")).astype(np.int64), [f"mask {mode}: luminance of each colour used as its value"]


def _read_image(path: pathlib.Path, min_size: int) -> tuple[np.ndarray, list[str]]:
  im, notes = _open_first_frame(path)
  with im:
    w, h = im.size
    if min(w, h) < min_size:
      raise _Skip(f"too small ({w}x{h}; min_size={min_size})")
    a, conv = _image_to_gray8(im)
  return a, notes + conv


def _read_mask(paths: list[pathlib.Path], shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
  merged = None
  notes: list[str] = []
  for p in paths:
    try:
      im, n = _open_first_frame(p)
    except _Skip as e:
      raise _Skip(f"mask {p.name}: {e}") from None
    with im:
      if (im.size[1], im.size[0]) != shape:
        raise _Skip(f"mask {p.name} is {im.size[0]}x{im.size[1]}, image is {shape[1]}x{shape[0]}")
      a, c = _mask_to_values(im)
    notes += [f"mask {p.name}: {x}" for x in n] + c
    merged = a if merged is None else np.maximum(merged, a)
  if len(paths) > 1:
    notes.append(f"{len(paths)} masks merged by pixel-wise maximum")
  return merged, notes


def _printable(name: str) -> str:
  """A file name as text any log stream can print: bytes that are not UTF-8 (Python keeps them as
  surrogates) become \\xNN escapes instead of breaking the log handler."""
  return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_gray(path, min_size: int = 16) -> np.ndarray:
  """(H, W) uint8 of one image file, converted as the folder datasets convert (`_read_image`);
  for a DICOM file its first frame's first B-mode region (``dicom.read_dicom``; ValueError when
  it cannot be decoded)."""
  from mae_jax.data import dicom

  path = pathlib.Path(path)
  if dicom.is_dicom_name(path) or (not path.suffix and dicom.has_dicom_magic(path)):
    try:
      return dicom.read_dicom(path, frames=None, min_size=min_size)[0][0].image
    except dicom.DicomError as e:
      raise ValueError(f"{_printable(str(path))}: {e}") from None
  a, _ = _read_image(path, min_size)
  return np.asarray(a).astype(np.uint8)
