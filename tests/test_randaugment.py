"""RandAugment against timm's own op functions and sampler; DeblurringMIM's evaluation crop and USFM's
bilinear resize against PIL + numpy (and torchvision) references; the configs that select them."""

import math
import os
import random

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from timm.data import auto_augment as taa
from torchvision import transforms as tvt

from mae_jax import config_files
from mae_jax.data import pipeline as P
from mae_jax.data import randaugment as RA
from mae_jax.data import transforms as T

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FILL_RGB = (124, 116, 104)  # timm: round(255 · IMAGENET_DEFAULT_MEAN)


def _image(mode: str, h=24, w=20, seed=0) -> Image.Image:
  rng = np.random.default_rng(seed)
  # A smooth ramp plus texture, using a narrow range so autocontrast / equalize have work to do.
  y, x = np.mgrid[0:h, 0:w]
  base = 60 + 3 * x + 2 * y
  shape = (h, w, 3) if mode == "RGB" else (h, w)
  noise = rng.integers(0, 40, shape)
  a = (base[..., None] if mode == "RGB" else base) + noise
  return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode)


class _Sign:
  """A stand-in generator whose `random()` is fixed: 0.9 keeps a sign, 0.1 flips it."""

  def __init__(self, u):
    self.u = u

  def random(self):
    return self.u


# ---------------------------------------------------------------------------------------- parse


def test_parse_deblurring_string():
  spec = RA.parse("rand-m9-mstd0.5-inc1")
  assert spec == RA.Spec(magnitude=9.0, num_layers=2, prob=0.5, magnitude_std=0.5, magnitude_max=10.0,
                         increasing=True)
  assert spec.ops == tuple(taa._RAND_INCREASING_TRANSFORMS)
  assert RA.parse("rand-m7-n3-p0.8-mmax12").ops == tuple(taa._RAND_TRANSFORMS)
  assert RA.parse("rand-m5-mstd101").magnitude_std == math.inf  # timm: > 100 means uniform
  assert RA.parse("") is None and RA.parse("  ") is None


@pytest.mark.parametrize("text", ["augmix-m5", "rand-m9-q3", "rand-mx", "rand-m9-tweights", "rand-n0",
                                  "rand-p1.5", "rand-m9-inc"])
def test_parse_errors_name_the_field(text):
  with pytest.raises(ValueError, match=r"config\.train\.randaugment="):
    RA.parse(text)


# ------------------------------------------------------------------------------ ops against timm


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", sorted(set(RA.OPS) | set(RA.INCREASING_OPS)))
@pytest.mark.parametrize("level", [0.0, 3.7, 9.0, 10.0])
def test_op_equals_timm(name, level, mode, monkeypatch):
  # timm negates with probability 1/2 through _randomly_negate; pin it to each sign in turn.
  hparams = {"translate_const": 100, "img_mean": FILL_RGB, "interpolation": Image.BICUBIC}
  fill = RA.fill_for(mode)
  im = _image(mode)
  for ours_u, negate in ((0.9, False), (0.1, True)):
    monkeypatch.setattr(taa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
    level_fn = taa.LEVEL_TO_ARG[name]
    ref_args = level_fn(level, hparams) if level_fn is not None else ()
    arg = RA._op_arg(name, level, _Sign(ours_u))
    assert (arg,) == tuple(ref_args) or (arg is None and ref_args == ())
    if name.startswith("Posterize") and arg == 0:
      # Pillow >= 11 refuses 0 bits; older Pillow (DeblurringMIM's time) computed the mask
      # ~(2^8 − 1): every pixel 0.
      ref = Image.new(mode, im.size, 0)
    else:
      ref = taa.NAME_TO_OP[name](im, *ref_args, fillcolor=fill, resample=Image.BICUBIC)
    out = RA.apply_op(im, name, arg, resample=Image.BICUBIC, fill=fill)
    assert out.mode == mode
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"{name} level {level}")


def test_fill_is_the_imagenet_mean():
  assert RA.fill_for("RGB") == FILL_RGB
  # PIL's L conversion (ITU-R 601-2 luma) of that colour.
  assert RA.fill_for("L") == round(0.299 * 124 + 0.587 * 116 + 0.114 * 104)
  # A big rotation shows the fill in the corners.
  out = RA.apply_op(Image.new("L", (16, 16), 255), "Rotate", 45.0)
  assert np.asarray(out)[0, 0] == RA.fill_for("L")


# ------------------------------------------------------------------------ sampling against timm

_LEVEL_OF = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}


def _timm_draws(config_str: str, n: int):
  """timm's RandAugment on n images with every op's function replaced by a recorder."""
  tf = taa.rand_augment_transform(config_str, {"translate_const": 100, "img_mean": FILL_RGB,
                                               "interpolation": Image.BICUBIC})
  record = []
  for op in tf.ops:
    op.aug_fn = (lambda name: lambda img, *args, **kw: (record[-1].append((name, args[0] if args else None)),
                                                        img)[1])(op.name)
  random.seed(0)
  np.random.seed(0)
  im = Image.new("RGB", (4, 4))
  for _ in range(n):
    record.append([])
    tf(im)
  return record


def _our_draws(config_str: str, n: int):
  spec = RA.parse(config_str)
  return [RA.sample(np.random.default_rng([7, i]), spec) for i in range(n)]


def _summary(draws):
  per_image = np.array([len(d) for d in draws])
  names = [name for d in draws for name, _ in d]
  levels = np.array([abs(a) / _LEVEL_OF[name] * 10 for d in draws for name, a in d if name in _LEVEL_OF])
  signs = np.array([a > 0 for d in draws for name, a in d if name in _LEVEL_OF and a != 0])
  return per_image, names, levels, signs


@pytest.mark.parametrize("config_str,clip_hi", [("rand-m9-mstd0.5-inc1", 1 - stats.norm.cdf(2.0)),
                                                ("rand-m9-mstd3-inc1", 1 - stats.norm.cdf(1 / 3))],
                         ids=["mstd0.5", "mstd3"])
def test_sampling_matches_timm(config_str, clip_hi):
  n = 3000
  ours, ref = _summary(_our_draws(config_str, n)), _summary(_timm_draws(config_str, n))
  for (per_image, names, levels, signs) in (ours, ref):
    # Applied ops per image ~ Binomial(2, 0.5).
    counts = np.bincount(per_image, minlength=3)
    assert stats.chisquare(counts, n * np.array([0.25, 0.5, 0.25])).pvalue > 1e-3
    # Which op: uniform over the 15 of the increasing set (drawn with replacement).
    freq = np.array([names.count(o) for o in RA.INCREASING_OPS])
    assert stats.chisquare(freq).pvalue > 1e-3
    # Magnitude N(9, std) clipped to [0, 10]: the clipped share at 10 matches the normal tail.
    assert np.all((levels >= 0) & (levels <= 10 + 1e-9))
    assert abs(np.mean(np.isclose(levels, 10)) - clip_hi) < 0.04
    assert abs(signs.mean() - 0.5) < 0.05
  # And the two samplers' level distributions agree with each other.
  assert stats.ks_2samp(ours[2], ref[2]).pvalue > 1e-3


def test_sampling_without_noise_is_fixed_magnitude():
  for d in _our_draws("rand-m6-n3-p1.0-inc1", 200):
    assert len(d) == 3
    for name, a in d:
      if name in _LEVEL_OF:
        assert abs(a) == pytest.approx(_LEVEL_OF[name] * 0.6)


def test_augment_deterministic_and_shape():
  spec = RA.parse("rand-m9-mstd0.5-inc1")
  a = np.asarray(_image("L"))[..., None]
  outs = [RA.augment(a, np.random.default_rng([1, i]), spec) for i in range(200)]
  again = [RA.augment(a, np.random.default_rng([1, i]), spec) for i in range(200)]
  for x, y in zip(outs, again):
    assert x.shape == a.shape and x.dtype == np.uint8
    np.testing.assert_array_equal(x, y)
  # An image is left alone when no layer fires (1/4) or only identities fire (Color on gray).
  assert 0.6 < np.mean([not np.array_equal(x, a) for x in outs]) < 0.8
  with pytest.raises(ValueError, match="uint8"):
    RA.augment(a.astype(np.float32), np.random.default_rng(0), spec)


# ------------------------------------------------------------------------------------- pipeline


def _source(n=12, h=40, w=40, with_mask=False):
  out = []
  for i in range(n):
    rec = {"image": np.asarray(_image("L", h, w, seed=i))[..., None], "label": i % 2, "index": i}
    if with_mask:
      rec["mask"] = (np.asarray(_image("L", h, w, seed=100 + i)) > 120).astype(np.uint8)[..., None]
    out.append(rec)
  return out


def test_pipeline_applies_randaugment_after_crop_and_flip():
  src, kw = _source(), dict(global_batch=4, image_size=32, seed=3)
  plain = [next(it) for it in [P.train_iterator(src, **kw)] for _ in range(3)]
  ra_it = P.train_iterator(src, rand_augment="rand-m9-mstd0.5-inc1", **kw)
  aug = [next(ra_it) for _ in range(3)]
  spec = RA.parse("rand-m9-mstd0.5-inc1")
  changed = 0
  for b, (x, y) in enumerate(zip(plain, aug)):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["zoom"], y["zoom"])
    for r in range(4):
      g = b * 4 + r
      want = RA.augment(x["image"][r], np.random.default_rng([3, g, 2]), spec, resample=Image.BICUBIC)
      np.testing.assert_array_equal(y["image"][r], want)
      changed += not np.array_equal(y["image"][r], x["image"][r])
  assert changed > 3
  with pytest.raises(ValueError, match="train.randaugment"):
    P.train_iterator(_source(with_mask=True), rand_augment="rand-m9", **kw)
  with pytest.raises(ValueError, match="train.randaugment"):
    P.train_iterator(src, rand_augment="rand-x", **kw)


# -------------------------------------------------------------------- evaluation crop, bilinear


@pytest.mark.parametrize("hw,new_hw,offset", [
    # S = 32, crop_pct 0.875: shorter side int(32 / 0.875) = 36; longer int(36 · long / short);
    # offsets int(round((side − 32) / 2)) with Python's half-to-even rounding.
    ((40, 56), (36, 50), (2, 9)),    # (36−32)/2 = 2, (50−32)/2 = 9
    ((56, 40), (50, 36), (9, 2)),
    ((37, 36), (37, 36), (2, 2)),    # already 36 on the short side: no resize; 2.5 → 2
    ((48, 48), (36, 36), (2, 2)),
])
def test_eval_center_crop_matches_reference(hw, new_hw, offset):
  h, w = hw
  src = _source(n=3, h=h, w=w, with_mask=True)
  b = next(P.eval_iterator(src, batch_size=4, image_size=32, crop_pct=0.875))
  for i in range(3):
    im = Image.fromarray(src[i]["image"][..., 0])
    if im.size != (new_hw[1], new_hw[0]):
      im = im.resize((new_hw[1], new_hw[0]), Image.BICUBIC)
    ref = np.asarray(im)[offset[0]:offset[0] + 32, offset[1]:offset[1] + 32]
    np.testing.assert_array_equal(b["image"][i, ..., 0], ref)
    m = Image.fromarray(src[i]["mask"][..., 0])
    if m.size != (new_hw[1], new_hw[0]):
      m = m.resize((new_hw[1], new_hw[0]), Image.NEAREST)
    np.testing.assert_array_equal(b["mask"][i, ..., 0],
                                  np.asarray(m)[offset[0]:offset[0] + 32, offset[1]:offset[1] + 32])
    np.testing.assert_allclose(b["zoom"][i], [new_hw[0] / h, new_hw[1] / w], rtol=1e-6)
    # torchvision's Resize(int) + CenterCrop, as DeblurringMIM's util/datasets.py builds them.
    tv = tvt.Compose([tvt.Resize(36, interpolation=tvt.InterpolationMode.BICUBIC), tvt.CenterCrop(32)])
    np.testing.assert_array_equal(b["image"][i, ..., 0], np.asarray(tv(Image.fromarray(src[i]["image"][..., 0]))))


def test_deblur_crop_at_224():
  assert T.shorter_side_size(224, 224 / 256) == 256
  im, (h, w) = T.resize_center_crop(Image.new("L", (300, 400)), 224, 224 / 256, Image.BICUBIC)
  assert im.size == (224, 224) and (h, w) == (341, 256)  # int(256 · 400 / 300) = 341


def test_bilinear_resize_matches_pil():
  src = _source(n=2, h=40, w=52, with_mask=True)
  b = next(P.eval_iterator(src, batch_size=2, image_size=32, interpolation="bilinear"))
  t = next(P.train_iterator(src, global_batch=2, image_size=32, seed=0, scale=(1.0, 1.0), ratio=(52 / 40, 52 / 40),
                            hflip=False, interpolation="bilinear"))
  for batch in (b, t):
    for r in range(2):
      i = int(batch["index"][r])
      ref = np.asarray(Image.fromarray(src[i]["image"][..., 0]).resize((32, 32), Image.BILINEAR))
      np.testing.assert_array_equal(batch["image"][r, ..., 0], ref)
      ref_m = np.asarray(Image.fromarray(src[i]["mask"][..., 0]).resize((32, 32), Image.NEAREST))
      np.testing.assert_array_equal(batch["mask"][r, ..., 0], ref_m)


# -------------------------------------------------------------------------------------- configs


def _config(name, arg):
  return config_files.load_module(os.path.join(CONFIGS, name)).get_config(arg)


def test_configs_select_the_papers_transforms():
  deblur = _config("finetune.py", "paper=deblur")
  assert T.train_options(deblur) == {"interpolation": "bicubic", "rand_augment": "rand-m9-mstd0.5-inc1"}
  assert T.eval_options(deblur) == {"interpolation": "bicubic", "crop_pct": 224 / 256}
  probe = _config("finetune.py", "paper=deblur,probe")
  assert T.train_options(probe)["rand_augment"] == "" and T.eval_options(probe)["crop_pct"] == 224 / 256
  d2mae = _config("finetune.py", "")
  assert T.train_options(d2mae)["rand_augment"] == "" and T.eval_options(d2mae)["crop_pct"] == 0.0
  usfm_seg = _config("segment.py", "paper=usfm")
  assert T.train_options(usfm_seg)["interpolation"] == "bilinear"
  assert T.eval_options(usfm_seg)["interpolation"] == "bilinear"
  assert T.train_options(_config("segment.py", ""))["interpolation"] == "bicubic"


@pytest.mark.parametrize("field,value,match", [
    ("data.interpolation", "nearest", "data.interpolation"),
    ("data.eval_crop_pct", 1.5, "data.eval_crop_pct"),
    ("train.randaugment", "rand-m9-zz", "train.randaugment"),
])
def test_config_errors_name_the_field(field, value, match):
  c = _config("finetune.py", "")
  group, key = field.split(".")
  c[group][key] = value
  with pytest.raises(ValueError, match=match):
    T.check_config(c)
  seg = _config("segment.py", "")
  seg.train.randaugment = "rand-m9"
  with pytest.raises(ValueError, match="train.randaugment"):
    T.check_config(seg)
