"""Per-paper downstream presets (`paper=`), the positive-class F1 and USFM's auxiliary FCN head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score

from mae_jax import config_files
from mae_jax.models import upernet, vit
from mae_jax.train import finetune


def test_finetune_presets_hold_the_published_values():
  d = config_files.load("finetune", "")
  assert (d.paper, d.train.batch_size, d.eval.select, d.eval.f1) == ("d2mae", 32, "macro_f1", "macro")
  u = config_files.load("finetune", "paper=usfm")
  assert u.paper == "usfm"
  assert (u.train.epochs, u.train.batch_size, u.train.warmup_epochs) == (200, 64, 20)
  assert (u.train.base_lr, u.train.lr_batch_base, u.train.layer_decay) == (1.25e-3, 512, 0.65)
  assert (u.train.label_smoothing, u.train.grad_clip, u.model.drop_path) == (0.1, 5.0, 0.1)
  assert u.train.min_lr == pytest.approx(2.5e-7 * 64 / 512)
  b = config_files.load("finetune", "paper=deblur")
  assert (b.train.batch_size, b.eval.select, b.eval.f1) == (256, "accuracy", "positive")
  assert config_files.load("linear_probe", "paper=deblur").train.batch_size == 1024
  large = config_files.load("finetune", "l,paper=usfm")
  assert (large.model.drop_path, large.train.base_lr, large.train.epochs) == (0.2, 1e-3, 50)
  assert config_files.load("finetune", "h").model.drop_path == 0.3
  with pytest.raises(ValueError, match="paper='nope'"):
    config_files.load("finetune", "paper=nope")


def test_segment_usfm_preset():
  s = config_files.load("segment", "paper=usfm")
  assert (s.train.batch_size, s.train.epochs, s.train.warmup_epochs) == (64, 400, 20)
  assert s.train.lr == pytest.approx(3e-4 * 64 / 512) and s.train.grad_clip == 5.0
  assert (s.model.channels, s.model.blocks, s.model.aux_channels) == (768, "4,6,8,12", 256)
  assert (s.train.aux_weight, s.train.dice_weight, s.train.ce_weight) == (0.4, 0.0, 1.0)
  assert config_files.load("segment", "").model.aux_channels == 0  # CE + Dice, no aux head


def test_positive_class_f1_equals_sklearn():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 50)
  probs = rng.uniform(size=(50, 2))
  c = config_files.load("finetune", "paper=deblur")
  names, fn = finetune.metrics_fn(c, 2)
  assert "f1_positive" in names
  m = fn(y, probs)
  assert m["f1_positive"] == pytest.approx(f1_score(y, probs.argmax(1), pos_label=1))
  assert m["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
  assert "f1_positive" not in finetune.metrics_fn(c, 3)[0]  # binary tasks only
  assert "f1_positive" not in finetune.metrics_fn(config_files.load("finetune", ""), 2)[0]


def test_auxiliary_fcn_head_on_the_stride_16_level():
  from flax import nnx
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=16, depth=2, num_heads=2)
  enc = vit.Encoder(spec, rngs=nnx.Rngs(0))
  seg = upernet.Segmenter(enc, 3, channels=8, norm_groups=4, blocks=(1, 1, 2, 2), aux_channels=8)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 1)), jnp.float32)
  logits, aux = seg(x, with_aux=True)
  assert logits.shape == aux.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(seg(x)), np.asarray(logits), atol=1e-6)
  pyramid = seg.pyramid(x)
  assert pyramid[upernet.AUX_LEVEL].shape[1] == 32 // 16
  want = upernet.resize_bilinear(seg.aux(pyramid[2]), (32, 32))
  np.testing.assert_allclose(np.asarray(aux), np.asarray(want), atol=1e-6)
  # The auxiliary head is trained: it receives a gradient.
  g = jax.grad(lambda a: jnp.sum(a(pyramid[2])))(seg.aux)
  assert float(jnp.abs(nnx.state(g, nnx.Param)["cls"]["kernel"][...]).sum()) > 0
  with pytest.raises(ValueError, match="auxiliary"):
    upernet.Segmenter(enc, 3, channels=8, norm_groups=4, blocks=(1, 1, 2, 2))(x, with_aux=True)


def test_scratch_baseline_builds_the_named_encoder_at_init():
  from mae_jax import models
  from mae_jax.models import beit
  from mae_jax.train import obs
  c = config_files.load("finetune", "smoke,scratch=usfm,seed=3", {"data.mean": 0.3, "data.std": 0.2})
  assert (c.init_from, c.scratch, c.scratch_args) == ("", "usfm", "smoke")
  pcfg, model, step, mean, std = obs.pretrained_for_transfer(c)
  assert (pcfg.recipe, step, mean, std) == ("usfm", 0, 0.3, 0.2)
  assert isinstance(model.encoder, beit.Encoder)
  fresh = models.build_pretrain_model(config_files.load("usfm", "smoke").model, seed=3)
  np.testing.assert_array_equal(np.asarray(model.encoder.cls_token[...]),
                                np.asarray(fresh.encoder.cls_token[...]))
  with pytest.raises(ValueError, match="init_from"):
    from mae_jax.train import downstream
    downstream.validate_common(config_files.load("finetune", "smoke"), 1, "base_lr")
