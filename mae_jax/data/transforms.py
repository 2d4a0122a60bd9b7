"""Per-paper choices of the host pipeline's resampling, and the pipeline options a downstream config
asks for (docs/methods.md#presets).

* ``data.eval_crop_pct`` (fine-tuning): 0 resizes the whole evaluation image to S × S (the default);
  a value in (0, 1] resizes its shorter side to ``int(S / crop_pct)`` and takes the centre S × S, as
  torchvision's ``Resize(int)`` + ``CenterCrop`` do in DeblurringMIM's evaluation transform
  (``util/datasets.py``: crop_pct 224/256 at input 224, i.e. 256 then 224).
* ``data.interpolation``: ``bicubic`` (MAE, DeblurringMIM) or ``bilinear`` for images; masks are
  always nearest-neighbour. USFM segments with albumentations' ``A.Resize`` (bilinear).
* ``train.randaugment``: a timm RandAugment string (:mod:`mae_jax.data.randaugment`), training only.
"""

from __future__ import annotations

from PIL import Image

from mae_jax.data import randaugment

__all__ = ["INTERPOLATIONS", "shorter_side_size", "resize_center_crop", "check_config", "train_options",
           "eval_options"]

INTERPOLATIONS = ("bicubic", "bilinear")


def shorter_side_size(image_size: int, crop_pct: float) -> int:
  """The side the shorter image side is resized to before the centre crop (DeblurringMIM:
  ``int(input_size / crop_pct)``)."""
  return int(int(image_size) / float(crop_pct))


def resize_center_crop(im: Image.Image, image_size: int, crop_pct: float, resample):
  """(cropped image, (new_h, new_w)): shorter side to ``shorter_side_size``, the longer side scaled
  by the same factor and truncated (torchvision ``Resize(int)``), then the centre ``image_size``
  square with torchvision ``CenterCrop``'s offsets ``int(round((side - S) / 2))``."""
  w, h = im.size
  short = shorter_side_size(image_size, crop_pct)
  if w <= h:
    new_w, new_h = short, int(short * h / w)
  else:
    new_w, new_h = int(short * w / h), short
  if (new_w, new_h) != (w, h):
    im = im.resize((new_w, new_h), resample)
  s = int(image_size)
  top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
  return im.crop((left, top, left + s, top + s)), (new_h, new_w)


def _fail(field: str, value, why: str):
  raise ValueError(f"config.{field}={value!r}: {why}")


def check_config(config) -> None:
  """The fields this module reads, checked before anything is built."""
  d, t = config.data, config.get("train", {})
  interp = d.get("interpolation", "bicubic")
  if interp not in INTERPOLATIONS:
    _fail("data.interpolation", interp, f"expected one of {INTERPOLATIONS}")
  pct = float(d.get("eval_crop_pct", 0.0) or 0.0)
  if not 0.0 <= pct <= 1.0:
    _fail("data.eval_crop_pct", pct, "must be 0 (resize the whole image) or lie in (0, 1]")
  spec = randaugment.parse(t.get("randaugment", "") or "")
  if spec is not None and config.get("job") == "segment":
    _fail("train.randaugment", t.randaugment, "is for classification: masks would not follow its "
          "geometric ops (use '')")


def train_options(config) -> dict:
  """Keyword arguments of ``pipeline.train_iterator`` that come from these fields."""
  check_config(config)
  return {"interpolation": config.data.get("interpolation", "bicubic"),
          "rand_augment": config.get("train", {}).get("randaugment", "") or ""}


def eval_options(config) -> dict:
  """Keyword arguments of ``pipeline.eval_iterator`` that come from these fields."""
  check_config(config)
  return {"interpolation": config.data.get("interpolation", "bicubic"),
          "crop_pct": float(config.data.get("eval_crop_pct", 0.0) or 0.0)}
