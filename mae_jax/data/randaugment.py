"""RandAugment as timm's ``rand_augment_transform`` runs it, on the host, one image at a time.

Deblurring MAE fine-tunes with ``--aa rand-m9-mstd0.5-inc1`` (openmedlab/DeblurringMIM
``main_finetune.py`` → ``util/datasets.py`` → timm ``create_transform``), applied after the random
resized crop and the flip. timm's semantics, which this module reproduces:

  * ``n`` layers (default 2); each picks one of 15 ops uniformly **with replacement** and applies it
    with probability ``p`` (default 0.5).
  * Magnitude per applied op: ``m`` plus Gaussian noise of std ``mstd`` (``mstd`` > 100: uniform on
    [0, m]), clipped to [0, ``mmax``] (default 10), then mapped to the op's argument on the scale
    m / 10. Signed ops (rotate, shear, translate, the "increasing" enhancements) flip sign with
    probability 1/2.
  * ``inc1`` selects the op set whose severity grows with the magnitude (posterize keeps 4 − ⌊4m/10⌋
    bits, 0 bits giving black; solarize thresholds at 256 − ⌊256m/10⌋, enhancement factors
    1 ± 0.9m/10, floored at 0.1).
  * Geometric ops resample with the pipeline's interpolation (DeblurringMIM: bicubic) and fill with
    the ImageNet mean in 0–255, (124, 116, 104): DeblurringMIM loads every image as RGB. A
    one-channel image is filled with PIL's L conversion of that colour (117).

Randomness comes from a ``numpy.random.Generator`` the caller seeds per draw, so a batch is a pure
function of (seed, draw number), as the grain pipeline needs. The draws are not timm's Python
``random`` stream: the distribution is the same, the individual samples are not.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["Spec", "parse", "sample", "apply_op", "augment", "fill_for", "OPS", "INCREASING_OPS", "FIELD"]

FIELD = "train.randaugment"
_LEVEL_SCALE = 10.0  # magnitudes are given on a 0–10 scale
IMAGENET_MEAN = (0.485, 0.456, 0.406)

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                  "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed ``rand-...`` string (timm's defaults where a section is absent)."""
  magnitude: float = 10.0
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0  # math.inf: uniform on [0, magnitude]
  magnitude_max: float = _LEVEL_SCALE
  increasing: bool = False

  @property
  def ops(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else OPS


_SECTION = re.compile(r"^([a-z]+)(\d.*)$")


def parse(text: str, field: str = FIELD) -> Spec | None:
  """``""`` → None (off); ``"rand-m9-mstd0.5-inc1"`` → Spec. Sections as timm's: m (int magnitude),
  n (layers), p (probability per layer), mstd (magnitude std; > 100 = uniform), mmax (clip bound),
  inc (0/1). Anything else is an error naming ``field``."""
  text = (text or "").strip()
  if not text:
    return None

  def bad(why: str):
    raise ValueError(f"config.{field}={text!r}: {why} "
                     "(expected e.g. 'rand-m9-mstd0.5-inc1', or '' for off)")

  parts = text.split("-")
  if parts[0] != "rand":
    bad("must start with 'rand' (timm's AutoAugment / AugMix policies are not implemented)")
  kw = {}
  for part in parts[1:]:
    m = _SECTION.match(part)
    if m is None:
      bad(f"section {part!r} is not KEY followed by a number (transform sets 't...' are not supported)")
    key, val = m.groups()
    try:
      if key == "m":
        kw["magnitude"] = float(int(val))
      elif key == "n":
        kw["num_layers"] = int(val)
      elif key == "p":
        kw["prob"] = float(val)
      elif key == "mstd":
        std = float(val)
        kw["magnitude_std"] = math.inf if std > 100 else std
      elif key == "mmax":
        kw["magnitude_max"] = float(int(val))
      elif key == "inc":
        kw["increasing"] = bool(int(val))
      else:
        bad(f"unknown section {part!r} (known: m, n, p, mstd, mmax, inc)")
    except ValueError as e:
      if str(e).startswith("config."):
        raise
      bad(f"section {part!r} has a malformed number")
  spec = Spec(**kw)
  if spec.num_layers < 1:
    bad("n must be >= 1")
  if not 0.0 <= spec.prob <= 1.0:
    bad("p must lie in [0, 1]")
  if spec.magnitude_std < 0:
    bad("mstd must be >= 0")
  return spec


def _signed(rng: np.random.Generator, v: float) -> float:
  return -v if rng.random() < 0.5 else v


def _op_arg(name: str, level: float, rng: np.random.Generator):
  """The op's argument at magnitude ``level`` (0–10 scale), as timm's level-to-argument maps."""
  f = level / _LEVEL_SCALE
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":
    return _signed(rng, 30.0 * f)
  if name == "Posterize":
    return int(4 * f)
  if name == "PosterizeIncreasing":
    return 4 - int(4 * f)
  if name == "Solarize":
    return min(256, int(256 * f))
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(256 * f))
  if name == "SolarizeAdd":
    return min(128, int(110 * f))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return 1.8 * f + 0.1
  if name.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness: 1 ± 0.9 f, at least 0.1
    return max(0.1, 1.0 + _signed(rng, 0.9 * f))
  if name in ("ShearX", "ShearY"):
    return _signed(rng, 0.3 * f)
  if name in ("TranslateXRel", "TranslateYRel"):
    return _signed(rng, 0.45 * f)  # a fraction of the image's width / height
  raise ValueError(f"unknown RandAugment op {name!r}")


def sample(rng: np.random.Generator, spec: Spec) -> list[tuple[str, object]]:
  """The ops one image gets, in order, with their arguments (skipped layers left out)."""
  ops = spec.ops
  out = []
  for _ in range(spec.num_layers):
    name = ops[int(rng.integers(len(ops)))]
    if rng.random() >= spec.prob:
      continue
    level = spec.magnitude
    if spec.magnitude_std == math.inf:
      level = rng.uniform(0.0, spec.magnitude)
    elif spec.magnitude_std > 0:
      level = rng.normal(spec.magnitude, spec.magnitude_std)
    level = float(min(max(level, 0.0), spec.magnitude_max))
    out.append((name, _op_arg(name, level, rng)))
  return out


def fill_for(mode: str, mean=IMAGENET_MEAN):
  """The fill colour of geometric ops for a PIL ``mode`` ('L' or 'RGB'): the mean in 0–255."""
  rgb = tuple(min(255, round(255 * m)) for m in mean)
  if mode == "RGB":
    return rgb
  return Image.new("RGB", (1, 1), rgb).convert(mode).getpixel((0, 0))


def _affine(im: Image.Image, coeffs, resample, fill) -> Image.Image:
  # PIL maps each output pixel (x, y) to the input at (a x + b y + c, d x + e y + f).
  return im.transform(im.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _solarize_add(im: Image.Image, add: int, thresh: int = 128) -> Image.Image:
  a = np.asarray(im).astype(np.int32)
  return Image.fromarray(np.where(a < thresh, np.minimum(a + add, 255), a).astype(np.uint8), im.mode)


def _posterize(im: Image.Image, bits: int) -> Image.Image:
  # Keeps the top `bits` bits. At 0 bits the image is black, as Pillow < 11 returned (timm's op at
  # magnitude 10 of the increasing set asks for 0 bits; newer Pillow refuses it).
  if bits >= 8:
    return im
  mask = (0xFF << (8 - int(bits))) & 0xFF
  return Image.fromarray(np.asarray(im) & np.uint8(mask), im.mode)


_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def apply_op(im: Image.Image, name: str, arg, *, resample=Image.BICUBIC, fill=None) -> Image.Image:
  """One op on a PIL image ('L' or 'RGB'); ``fill`` defaults to ``fill_for(im.mode)``."""
  fill = fill_for(im.mode) if fill is None else fill
  base = name[:-len("Increasing")] if name.endswith("Increasing") else name
  if base == "AutoContrast":
    return ImageOps.autocontrast(im)
  if base == "Equalize":
    return ImageOps.equalize(im)
  if base == "Invert":
    return ImageOps.invert(im)
  if base == "Rotate":
    return im.rotate(arg, resample=resample, fillcolor=fill)
  if base == "Posterize":
    return _posterize(im, arg)
  if base == "Solarize":
    return ImageOps.solarize(im, arg)
  if base == "SolarizeAdd":
    return _solarize_add(im, arg)
  if base in _ENHANCERS:
    return _ENHANCERS[base](im).enhance(arg)
  if base == "ShearX":
    return _affine(im, (1, arg, 0, 0, 1, 0), resample, fill)
  if base == "ShearY":
    return _affine(im, (1, 0, 0, arg, 1, 0), resample, fill)
  if base == "TranslateXRel":
    return _affine(im, (1, 0, arg * im.size[0], 0, 1, 0), resample, fill)
  if base == "TranslateYRel":
    return _affine(im, (1, 0, 0, 0, 1, arg * im.size[1]), resample, fill)
  raise ValueError(f"unknown RandAugment op {name!r}")


def augment(a: np.ndarray, rng: np.random.Generator, spec: Spec, *, resample=Image.BICUBIC) -> np.ndarray:
  """RandAugment on one (H, W, C) uint8 image, C = 1 or 3; same shape and dtype out."""
  if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (1, 3):
    raise ValueError(f"RandAugment needs an (H, W, 1|3) uint8 image, got {a.dtype} {a.shape}")
  ops = sample(rng, spec)
  if not ops:
    return a
  gray = a.shape[-1] == 1
  im = Image.fromarray(np.ascontiguousarray(a[..., 0] if gray else a), "L" if gray else "RGB")
  fill = fill_for(im.mode)
  for name, arg in ops:
    im = apply_op(im, name, arg, resample=resample, fill=fill)
  out = np.asarray(im, dtype=np.uint8)
  return out[..., None] if out.ndim == 2 else out
