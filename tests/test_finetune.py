"""Downstream transfer (docs/methods.md#downstream): the heads, mixup/cutmix, recipe-aware transfer, and end to end —
smoke pretraining, then fine-tuning beats chance on the built-in dataset with a bootstrap CI, and
the linear probe runs. One pretraining workdir is shared by the session (tests/downstream_runs.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax import recipes
from mae_jax.models import heads
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit
from mae_jax.train import finetune, obs, transfer
from tests import downstream_runs
from tests.conftest import load_config

SPEC = vit.ViTSpec(image_size=16, patch_size=8, in_chans=1, width=16, depth=2, num_heads=2)


def _mae(blur_embed="none", seed=0):
  return mae_lib.MAE(SPEC, decoder_width=16, decoder_depth=1, decoder_heads=2, blur_embed=blur_embed,
                     rngs=nnx.Rngs(seed))


def _layer_norm(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


# ---------------------------------------------------------------------------------------- heads


def test_classifier_pools_patch_tokens_without_final_norm():
  model = _mae()
  clf = heads.from_pretrained(model, 3, kind="finetune", drop_path=0.1)
  assert clf.fc_norm.epsilon == 1e-6 and isinstance(clf.encoder.pos_embed, nnx.Param)
  np.testing.assert_array_equal(clf.encoder.cls_token[...], model.encoder.cls_token[...])
  np.testing.assert_array_equal(clf.encoder.blocks[1].mlp.fc2.kernel[...],
                                model.encoder.blocks[1].mlp.fc2.kernel[...])
  assert clf.encoder.blocks[1].drop_path_rate == pytest.approx(0.1)
  # Head: normal(2e-5) weights, zero bias.
  wide = heads.Classifier(vit.Encoder(vit.ViTSpec(image_size=16, patch_size=8, width=64, depth=1,
                                                  num_heads=2), rngs=nnx.Rngs(0)), 64)
  w = np.asarray(wide.head.kernel[...])  # 4096 draws: the std is within ~1% of 2e-5
  assert abs(w.std() / 2e-5 - 1) < 0.05 and abs(w.mean()) < 2e-6 and not np.any(wide.head.bias[...])
  # Forward written out by hand: blocks (no final norm) -> mean of patch tokens -> LayerNorm -> Linear.
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))

  @nnx.jit
  def blocks_only(enc, x):
    h = jnp.concatenate([enc.cls(3), enc.embed(x)], axis=1)
    for blk in enc.blocks:
      h = blk(h)
    return h

  h = blocks_only(model.encoder, x)
  pooled = _layer_norm(np.asarray(h[:, 1:].mean(1), np.float64))
  ref = pooled @ np.asarray(clf.head.kernel[...], np.float64) + np.asarray(clf.head.bias[...])
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(clf, x)), ref, rtol=1e-4, atol=1e-9)
  # Drop path is active only with a key.
  feats = nnx.jit(lambda m, x, k: (m.features(x, key=k), m.features(x)))(clf, x, jax.random.key(0))
  assert not np.allclose(*feats)


def test_blur_token_sequence_matches_pretraining():
  """[CLS, BLU(t), patches] with the pretrained token: the encoder output equals MAE's encoder at
  mask ratio 0."""
  model = _mae("token", seed=2)
  clf = heads.from_pretrained(model, 2, kind="finetune")
  np.testing.assert_array_equal(clf.blur_token[...], model.blur_token[...])
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
  t = jnp.array([3, 7])
  noise = jnp.broadcast_to(jnp.arange(4.0), (2, 4))
  latent = nnx.jit(lambda m, x, t: m.forward_encoder(x, noise, 0.0, t)[0])(model, x, t)
  ours = nnx.jit(lambda c, x, t: c.encoder.transform(c.tokens(x, t)))(clf, x, t)
  np.testing.assert_allclose(ours, latent, atol=1e-5)
  with pytest.raises(ValueError, match="blur_t"):
    clf.tokens(x)
  add = heads.from_pretrained(_mae("add"), 2, kind="finetune")
  assert add.num_prefix == 1 and jax.eval_shape(lambda: add(x, blur_t=t)).shape == (2, 2)


def test_linear_probe_trains_only_the_head():
  model = _mae()
  probe = heads.from_pretrained(model, 3, kind="linear_probe")
  assert probe.bn.scale is None and probe.bn.bias is None and probe.bn.epsilon == 1e-6
  trainable = nnx.state(probe, nnx.All(nnx.Param, nnx.PathContains("head")))
  assert set(nnx.to_pure_dict(trainable)) == {"head"}
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  feats = nnx.jit(lambda e, x: e(x)[:, 0])(model.encoder, x)  # CLS after the final norm
  np.testing.assert_allclose(nnx.jit(lambda p, x: p.features(x))(probe, x), feats, atol=1e-6)
  out = nnx.jit(lambda p, x: p(x, train=True))(probe, x)
  assert out.shape == (4, 3)
  np.testing.assert_allclose(probe.bn.mean[...], 0.1 * np.asarray(feats).mean(0), rtol=1e-4, atol=1e-6)


def test_mixup_cutmix_targets_match_pixels():
  n, s = 4, 16
  x = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, s, s, 1))
  y = jax.nn.one_hot(jnp.arange(n), n)
  mix = jax.jit(finetune.mixup_cutmix, static_argnames=("mixup", "cutmix"))
  for seed in range(6):
    xm, ym = mix(jax.random.key(seed), x, y, mixup=0.0, cutmix=1.0)
    own = np.mean(np.asarray(xm[0]) == 0.0)  # image 0 mixed with image 3 (the reversed batch)
    assert ym[0, 0] == pytest.approx(own, abs=1e-6) and ym[0, 3] == pytest.approx(1 - own, abs=1e-6)
    xm, ym = mix(jax.random.key(seed), x, y, mixup=0.8, cutmix=0.0)
    lam = float(ym[0, 0])
    np.testing.assert_allclose(xm[0], lam * 0 + (1 - lam) * 3, rtol=1e-5)
    np.testing.assert_allclose(ym.sum(1), 1.0, rtol=1e-6)
  same, _ = finetune.mixup_cutmix(jax.random.key(0), x, y, mixup=0.0, cutmix=0.0)
  assert same is x
  sm = finetune.soft_targets(jnp.array([2]), 3, 0.1)
  np.testing.assert_allclose(sm, [[0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]], rtol=1e-6)


# -------------------------------------------------------------------------- transfer corruption


def test_transfer_plan_follows_the_pretraining_recipe():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  deblur = load_config("deblur_mae", "smoke")
  plan = transfer.TransferPlan(deblur, None, None)
  np.testing.assert_array_equal(plan.apply(x, None), recipes.transfer_blur(deblur, x))
  assert not np.allclose(plan.apply(x, None), x)
  assert transfer.TransferPlan(load_config("mae", "smoke"), None, None).apply(x, None) is x

  d2 = load_config("d2mae", "smoke")
  srcs = {"train": [0] * 3, "validation": [0] * 2, "test": [0] * 2}
  kw = dict(model=None, workdir="", init_from="", ckpt_step=0, config=None, mean=0.0, std=1.0)
  fixed = transfer.d2mae_tables(d2, {"mode": "fixed", "step": 2, "fixed_sigma": 0.5}, srcs, **kw)
  assert fixed["train"]["t"].tolist() == [5, 5, 5] and np.allclose(fixed["test"]["sigma"], 0.5)
  plan = transfer.TransferPlan(d2, {"mode": "fixed", "step": 2, "fixed_sigma": 0.5}, fixed)
  rows = plan.lookup("train", np.array([2, -1]))
  assert rows["blur_t"].tolist() == [5, 5]
  np.testing.assert_allclose(plan.apply(x, jnp.full((2,), 0.5)),
                             recipes.transfer_blur(d2, x, jnp.full((2,), 0.5)), atol=1e-7)
  none = transfer.d2mae_tables(d2, {"mode": "none", "step": 2, "fixed_sigma": 0.5}, srcs, **kw)
  assert none["validation"]["t"].tolist() == [0, 0]
  assert not transfer.TransferPlan(d2, {"mode": "none"}, none).per_image_blur


def test_obs_settings_default_to_the_pretraining_config():
  d2 = load_config("d2mae", "smoke,obs=fixed,step=3")
  ft = load_config("finetune", "smoke")
  assert obs.resolve_settings(ft, d2) == {"mode": "fixed", "step": 3, "fixed_sigma": 0.5}
  ft = load_config("finetune", "smoke,obs=search,step=1")
  assert obs.resolve_settings(ft, d2) == {"mode": "search", "step": 1, "fixed_sigma": 0.5}
  ft.obs.mode = "sometimes"
  with pytest.raises(ValueError, match="config.obs.mode"):
    obs.resolve_settings(ft, d2)


def test_init_from_errors_name_the_field(tmp_path):
  c = load_config("finetune", "smoke")
  with pytest.raises(ValueError, match="config.init_from"):
    finetune.run(c, str(tmp_path / "a"))
  empty = tmp_path / "empty_pretrain"
  empty.mkdir()
  c.init_from = str(empty)
  with pytest.raises(ValueError, match="config.init_from=.*no checkpoint"):
    finetune.run(c, str(tmp_path / "b"))


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mae_pretrain(tmp_path_factory):
  """configs/mae.py:smoke, as `python -m mae_jax.main --config=configs/mae.py:smoke` runs it."""
  return downstream_runs.mae_smoke_pretrain(tmp_path_factory)


@pytest.fixture(scope="module")
def finetuned(mae_pretrain, tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ft"))
  c = load_config("finetune", f"smoke,init_from={mae_pretrain}")
  return wd, finetune.run(c, wd)


def test_finetune_beats_chance_with_ci(finetuned):
  wd, res = finetuned
  f1, lo, hi = res["test_ci"]["macro_f1"]
  assert lo <= f1 <= hi and hi - lo > 0
  assert f1 > res["chance_macro_f1"], (f1, res["chance_macro_f1"])
  with open(os.path.join(wd, "results.json")) as f:
    out = json.load(f)
  assert out["test"]["macro_f1"]["value"] == pytest.approx(f1)
  assert out["classes"] == ["normal", "benign", "malignant"] and out["layer_decay"] == 0.75
  assert len(out["validation_history"]) == len(res["history"]) >= out["validation_best"]["epoch"] >= 1
  md = open(os.path.join(wd, "results.md")).read()
  assert "macro_f1" in md and "[" in md
  pred = np.load(os.path.join(wd, "predictions_test.npz"))
  assert pred["probs"].shape == (64, 3) and np.allclose(pred["probs"].sum(1), 1, atol=1e-5)
  # The best parameters are kept as a checkpoint next to the latest state.
  assert os.path.isdir(os.path.join(wd, "best", "checkpoints"))


def test_linear_probe_smoke_learns_more_than_the_majority_class(mae_pretrain, tmp_path):
  """The smoke probe once learnt only its bias (LARS at a large-batch lr barely moves the weights in
  240 steps) and predicted the majority class."""
  c = load_config("linear_probe", f"smoke,init_from={mae_pretrain}")
  c.eval.n_boot = 50
  res = finetune.run(c, str(tmp_path / "lp"))
  assert len(res["history"]) == 30 and np.isfinite(res["test"]["accuracy"])
  with open(tmp_path / "lp" / "results.json") as f:
    assert json.load(f)["rows"][0]["job"] == "linear_probe"
  pred = np.load(tmp_path / "lp" / "predictions_test.npz")
  labels, guess = pred["label"], pred["probs"].argmax(1)
  # Always the majority class m: F1 of m is 2p/(1 + p) (p its share), every other class's is 0.
  p = np.bincount(labels, minlength=3).max() / len(labels)
  majority_macro_f1 = 2 * p / (1 + p) / 3
  assert len(np.unique(guess)) > 1, np.bincount(guess)
  assert res["test"]["macro_f1"] > majority_macro_f1 + 0.05, (res["test"]["macro_f1"], majority_macro_f1)


def test_scanned_finetune_gives_the_plain_loss(mae_pretrain, tmp_path, monkeypatch):
  """A downstream config's model.scan_layers / remat reach the classifier (`run=` of
  heads.from_pretrained): its blocks are stacked, and the first steps' losses are the plain run's."""
  from mae_jax.models import vit
  from mae_jax.train import loop
  built = []
  original = heads.from_pretrained

  def spy(*a, **k):
    model = original(*a, **k)
    built.append(vit.is_scanned(model.encoder.blocks))
    return model

  monkeypatch.setattr(heads, "from_pretrained", spy)
  losses = {}
  for name, run in (("plain", {}), ("scan", {"scan_layers": True, "remat": "full"})):
    c = load_config("finetune", f"smoke,init_from={mae_pretrain}")
    c.train.total_steps, c.train.log_every, c.eval.n_boot = 4, 1, 10
    c.model.drop_path = 0.0  # the per-block drop-path draws are not the scan's
    c.model.update(run)
    finetune.run(c, str(tmp_path / name))
    losses[name] = [r["loss"] for r in loop.read_metrics(str(tmp_path / name))]
  assert built == [False, True]
  assert len(losses["plain"]) == 4
  np.testing.assert_allclose(losses["scan"], losses["plain"], rtol=1e-5)
  with pytest.raises(ValueError, match="model.remat"):
    c = load_config("finetune", f"smoke,init_from={mae_pretrain}")
    c.model.remat = "sometimes"
    finetune.validate_config(c, 1)


def test_early_stop_ends_the_run_and_a_rerun_trains_no_further(mae_pretrain, tmp_path, caplog):
  """`train.early_stop_epochs`: once that many epochs passed without a better validation score the
  loop ends at that epoch's last step (checkpointed), the test split is scored with the best epoch,
  and a rerun in the same workdir resumes into a run that is already over."""
  from mae_jax.train import optim
  c = load_config("finetune", f"smoke,init_from={mae_pretrain}")
  c.train.epochs, c.train.early_stop_epochs, c.eval.n_boot = 6, 1, 10
  c.train.base_lr, c.train.min_lr = 1e-9, 0.0  # next to nothing learns: the best epoch comes early
  wd = str(tmp_path / "es")
  res = finetune.run(c, wd)
  from mae_jax.data import sources
  per_epoch = optim.Steps.of(c.train, len(sources.open_source(c.data, "train", task="classify"))).per_epoch
  best = res["best"]["epoch"]
  # stopped after the first epoch that is `early_stop_epochs` past the best, not at epoch 6
  assert res["step"] == (best + 1) * per_epoch < 6 * per_epoch, (res["step"], best)
  assert [h["epoch"] for h in res["history"]] == list(range(1, best + 2))
  assert os.path.exists(os.path.join(wd, "results.json"))
  os.remove(os.path.join(wd, "results.md"))  # as if killed before its results: a rerun resumes
  again = finetune.run(c, wd)
  assert again["step"] == res["step"] and again["best"]["epoch"] == best
