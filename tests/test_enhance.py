"""Image enhancement (issue 16): the paired phantom data, the CycleGAN pieces against independent
references (torch's transposed convolution, the official ImagePool written as a Python loop), the
non-finite guard and preemption / resume of the enhancement step, and the acceptance run: a smoke
enhancement from a smoke pretraining whose cycle loss falls, whose test SSIM beats the identity
baseline, and whose frozen encoder ends bit-identical to the pretraining checkpoint."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax.data import phantom, phantom_pairs
from mae_jax.models import cyclegan
from mae_jax.train import checkpoint, core, enhance
from tests import smoke_runs
from tests.conftest import load_config


# ------------------------------------------------------------------------------------------ data


def test_pairs_share_the_scene_and_the_low_image_is_degraded():
  from skimage.metrics import structural_similarity
  for index in range(4):
    pair = phantom_pairs.simulate_pair(0, index, 64)
    ref = phantom.simulate(0, index, 64)
    # The same organ, class and lesion mask as the pretraining dataset's image of this index.
    assert (pair["organ"], pair["label"]) == (ref["organ"], ref["label"])
    np.testing.assert_array_equal(pair["mask"], ref["mask"])
    lo, hi = pair["low"] / 255.0, pair["high"] / 255.0
    # Lower contrast: the grey levels inside the field of view spread less.
    fov = pair["high"] > 0
    assert lo[fov].std() < 0.8 * hi[fov].std()
    # The high image is the same acquisition model as phantom.simulate's, up to the speckle draw:
    # mean intensities agree within a few grey levels.
    assert abs(pair["high"].mean() - ref["image"].mean()) < 8
    assert structural_similarity(lo, hi, data_range=1.0) < 0.95


def test_low_quality_psf_is_wider_in_both_axes():
  # Closed form (phantom.Probe): axial σ ∝ 1/(bandwidth·f0), lateral σ at the focus ∝ F#/f0.
  rng = np.random.default_rng(0)
  for geometry in ("linear", "convex"):
    probe = phantom.sample_probe(rng, geometry)
    low = phantom_pairs.low_quality_probe(probe, phantom_pairs.LowQuality())
    np.testing.assert_allclose(low.axial_sigma() / probe.axial_sigma(), 1 / (0.55 * 0.7), rtol=1e-6)
    np.testing.assert_allclose(low.lateral_sigma(np.array([probe.focus])) / probe.lateral_sigma(
        np.array([probe.focus])), 2.0 / 0.55, rtol=1e-6)


def test_enhance_config_is_a_new_dataset_and_leaves_the_others_alone():
  from mae_jax.data import us_phantom
  assert us_phantom.make_config(num_train=8).name == "s256_tr8_va200_te200_seed0"
  assert us_phantom.make_config(num_train=8, task="enhance").name == "s256_tr8_va200_te200_seed0_enhance"
  with pytest.raises(ValueError, match="task"):
    us_phantom.make_config(task="denoise")


def test_folder_layout_pairs_by_name_and_trains_on_unpaired(tmp_path):
  from PIL import Image

  from mae_jax.data import folder
  rng = np.random.default_rng(0)
  for side, names in (("low", [f"p{i}" for i in range(10)] + ["only_low"]),
                      ("high", [f"p{i}" for i in range(10)] + ["only_high"])):
    (tmp_path / side).mkdir()
    for n in names:
      Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / side / f"{n}.png")
  (tmp_path / "low" / "broken.png").write_bytes(b"not an image")
  lay = folder.enhance_layout(tmp_path, split_seed=0)
  assert [len(lay[s]["pairs"]) for s in ("train", "validation", "test")] == [7, 2, 1]  # 70/15/15 of 10
  for s in ("validation", "test"):
    for a, b in lay[s]["pairs"]:
      assert a.stem == b.stem and a.parent.name == "low" and b.parent.name == "high"
  assert any(p.stem == "only_low" for p in lay["train"]["low"])
  assert any(p.stem == "only_high" for p in lay["train"]["high"])
  assert [p for p, _ in lay["train"]["skipped"]] == [str(tmp_path / "low" / "broken.png")]


# ----------------------------------------------------------------------------------------- model


def test_upsampling_equals_torch_conv_transpose():
  import torch
  gen = nnx.merge(*cyclegan.init(0, ngf=2, n_blocks=0, ndf=2, n_layers=1)).G_A
  x = np.random.default_rng(0).random((1, 5, 6, 8)).astype(np.float32)  # 4·ngf channels in
  t = torch.nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
  with torch.no_grad():  # flax kernels (kh, kw, in, out), not flipped; torch (in, out, kh, kw)
    t.weight.copy_(torch.tensor(np.asarray(gen.up1.kernel[...])[::-1, ::-1].transpose(2, 3, 0, 1).copy()))
    t.bias.copy_(torch.tensor(np.asarray(gen.up1.bias[...])))
    want = t(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(gen.up1(jnp.asarray(x)))
  assert got.shape == (1, 10, 12, 4)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert [cyclegan.receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]


def test_resblock_equals_torch_reflection_pad_conv_instance_norm():
  """nnx.Conv(padding='REFLECT') and nnx.InstanceNorm (no affine) against the official block:
  ReflectionPad2d(1), Conv2d 3×3, InstanceNorm2d, ReLU, ReflectionPad2d(1), Conv2d, InstanceNorm2d, + x."""
  import torch
  blk = nnx.merge(*cyclegan.init(1, ngf=2, n_blocks=1, ndf=2, n_layers=1)).G_A.blocks[0]
  rng = np.random.default_rng(0)
  for conv in (blk.c1, blk.c2):  # O(1) activations, and biases for the norm's mean to remove
    conv.kernel[...] = jnp.asarray(rng.normal(0.0, 0.3, conv.kernel.shape).astype(np.float32))
    conv.bias[...] = jnp.asarray(rng.normal(0.0, 0.1, conv.bias.shape).astype(np.float32))
  x = rng.normal(size=(2, 7, 9, 8)).astype(np.float32)

  def torch_conv(conv):
    c = torch.nn.Conv2d(8, 8, 3)
    with torch.no_grad():
      c.weight.copy_(torch.tensor(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy()))
      c.bias.copy_(torch.tensor(np.asarray(conv.bias[...])))
    return c

  ref = torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch_conv(blk.c1), torch.nn.InstanceNorm2d(8),
                            torch.nn.ReLU(), torch.nn.ReflectionPad2d(1), torch_conv(blk.c2),
                            torch.nn.InstanceNorm2d(8))
  with torch.no_grad():
    xt = torch.tensor(x.transpose(0, 3, 1, 2))
    want = (xt + ref(xt)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(blk(jnp.asarray(x))), want, atol=2e-5)


def _pool_reference(images, count, batch, keys):
  """The official ImagePool.query as a loop, with the draws taken from the same keys."""
  images, out = np.array(images), []
  for img, k in zip(batch, keys):
    k_p, k_i = jax.random.split(k)
    if count < len(images):
      images[count] = img
      count += 1
      out.append(img)
    elif float(jax.random.uniform(k_p)) > 0.5:
      j = int(jax.random.randint(k_i, (), 0, len(images)))
      out.append(images[j].copy())
      images[j] = img
    else:
      out.append(img)
  return images, count, np.stack(out)


def test_image_pool_matches_the_official_rule():
  pool = np.zeros((3, 2, 2, 1), np.float32)
  count = 0
  key = jax.random.key(0)
  for step in range(4):  # fills, then swaps about half of the time
    batch = (np.full((2, 2, 2, 1), step + 1.0) + np.arange(2)[:, None, None, None] / 10).astype(np.float32)
    key, k = jax.random.split(key)
    want = _pool_reference(pool, count, batch, jax.random.split(k, 2))
    got = enhance.query_pool(jnp.asarray(pool), jnp.asarray(count, jnp.int32), jnp.asarray(batch), k)
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    assert int(got[1]) == want[1]
    np.testing.assert_array_equal(np.asarray(got[2]), want[2])
    pool, count = want[0], want[1]
  assert count == 3


def _tiny_config(**train):
  c = load_config("enhance", "smoke")
  c.model.image_size, c.model.ngf, c.model.n_blocks, c.model.ndf, c.model.n_layers = 16, 4, 1, 4, 1
  c.data.native_size = 16
  c.train.batch_size = 2
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.mark.parametrize("field,value,match", [
    ("model.n_layers", 0, "model.n_layers"), ("model.image_size", 30, "model.image_size"),
    ("train.pool_size", -1, "train.pool_size"), ("data.organ", "heart", "data.organ"),
    ("train.checkpoint_every", 3, "train.checkpoint_every"), ("train.lr", 0.0, "train.lr")])
def test_bad_config_names_the_field_before_anything_runs(field, value, match, tmp_path):
  c = load_config("enhance", "smoke")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    enhance.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # nothing written, nothing built


def test_a_non_finite_step_is_skipped_with_the_pools_unchanged():
  config = _tiny_config(pool_size=4)
  graphdef, params, rest = cyclegan.init(0, ngf=4, n_blocks=1, ndf=4, n_layers=1)
  schedule = enhance.linear_decay(1e-3, 10, 0.5)
  import optax
  tx = optax.adam(schedule, b1=0.5, b2=0.999)
  step, _ = enhance.make_steps(config, graphdef, rest, tx, schedule, None)
  step = jax.jit(step)
  state = core.init_state(params, tx, 0)
  pool = enhance.init_pool(4, (16, 16, 1))
  rng = np.random.default_rng(0)
  batch = {"low": jnp.asarray(rng.integers(0, 255, (2, 16, 16, 1)), jnp.float32),
           "high": jnp.asarray(rng.integers(0, 255, (2, 16, 16, 1)), jnp.float32)}
  state, pool, m = step(state, pool, {}, batch)
  assert float(m["finite"]) == 1.0 and int(pool["n_A"]) == 2
  before = jax.tree.map(np.asarray, (state.params, state.opt_state, pool))
  bad = dict(batch, low=batch["low"].at[0, 0, 0, 0].set(jnp.nan))
  state, pool, m = step(state, pool, {}, bad)
  assert float(m["finite"]) == 0.0 and int(state.skipped) == 1 and int(state.bad_steps) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state, pool)), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_preempted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  """SIGTERM mid-run: checkpoint (state, pools, best parameters, validation history) and exit; the
  rerun ends bit-identical to an uninterrupted run (same draws: batches are a function of the step)."""
  def config():
    c = _tiny_config(epochs=2, eval_every=1, checkpoint_every=1, log_every=1)
    c.data.num_train, c.data.num_validation, c.data.num_test = 8, 4, 4  # 4 steps per epoch
    c.eval.n_boot, c.eval.figure_images = 20, 0
    return c

  ref = enhance.run(config(), str(tmp_path / "ref"))
  real = enhance.train_batch

  def sigterm_at_step_6(data, cfg, step, mesh):
    if step == 6:  # while drawing the 7th batch, after step 6: the run stops before dispatching it
      os.kill(os.getpid(), signal.SIGTERM)
    return real(data, cfg, step, mesh)

  monkeypatch.setattr(enhance, "train_batch", sigterm_at_step_6)
  first = enhance.run(config(), str(tmp_path / "w"))
  assert first == {"preempted": True, "step": 6}
  monkeypatch.setattr(enhance, "train_batch", real)
  second = enhance.run(config(), str(tmp_path / "w"))
  for a, b in zip(jax.tree.leaves(checkpoint.restore_params(str(tmp_path / "ref"))[1]),
                  jax.tree.leaves(checkpoint.restore_params(str(tmp_path / "w"))[1]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert second["best"] == ref["best"]
  for k in ref["test"]:
    assert second["test"][k] == ref["test"][k], k
  got, want = (json.load(open(tmp_path / d / "results.json")) for d in ("w", "ref"))
  assert got["validation_history"] == want["validation_history"] and len(got["validation_history"]) == 2


# ------------------------------------------------------------------------------------ acceptance


def test_smoke_enhancement_from_a_smoke_pretraining(tmp_path_factory, tmp_path):
  pre = smoke_runs.smoke_workdir(smoke_runs.shared_root(tmp_path_factory), "mae")
  c = load_config("enhance", f"smoke,organ=thyroid,init_from={pre}")
  c.train.epochs, c.eval.n_boot = 10, 100  # 80 steps: ~1 minute on 2 cores
  res = enhance.run(c, str(tmp_path / "enh"))
  cycle = [h["cycle"] for h in res["loss_history"]]
  assert cycle[-1] < 0.6 * cycle[0], cycle
  # Better than handing back the low-quality input, on every summary and by a margin.
  assert res["test"]["ssim"] > res["identity"]["ssim"] + 0.05, (res["test"], res["identity"])
  # The frozen encoder: bit-identical to the pretraining checkpoint after training, and absent
  # from the trained state.
  _, pretrained = checkpoint.restore_params(pre)
  used = res["frozen"]["params"]
  flat_used = dict(jax.tree_util.tree_leaves_with_path(used))
  flat_pre = dict(jax.tree_util.tree_leaves_with_path(pretrained["encoder"]))
  assert flat_used.keys() == flat_pre.keys() and flat_used
  for k, v in flat_pre.items():
    np.testing.assert_array_equal(np.asarray(flat_used[k]), np.asarray(v))
  _, trained = checkpoint.restore_params(str(tmp_path / "enh"))
  assert sorted(trained) == ["D_A", "D_B", "G_A", "G_B"]
  assert "fuse" in trained["G_A"] and "fuse" in trained["G_B"]  # the feature branch in both directions
  results = json.loads((tmp_path / "enh" / "results.json").read_text())
  assert results["method"] == "CycleGAN + mae features" and results["test_n"] > 0
  assert (tmp_path / "enh" / "enhanced_test.png").stat().st_size > 0
  # The comparison figure from workdirs (here the same one twice), as the command line makes it.
  from mae_jax import visualize
  out = tmp_path / "fig.png"
  wd = str(tmp_path / "enh")
  assert visualize.main([f"--enhance={wd},{wd}", "--out", str(out), "--images", "2"]) == [str(out)]
  assert out.stat().st_size > 0


def test_table4_sweep_runs_three_rows_per_organ_with_its_metrics(tmp_path):
  from mae_jax import sweeps
  exp = sweeps.get_experiment("usfm_table4")
  pretrained, transferred = [], []

  def fake_pretrain(name, args, workdir, seed, overrides):
    pretrained.append((name, args, seed))

  def fake_transfer(name, args, workdir, pre, seed, overrides):
    transferred.append((name, args))
    assert sweeps.load_config(name, args).job == "enhance"
    s = 0.7 + (0.01 if "nofeatures" not in args else 0.0) + 0.001 * seed
    return {"test": {"ssim": {"value": s}, "lncc": {"value": 0.8}, "nmi_sym": {"value": 0.4},
                     "nmi": {"value": 1.25}}}

  res = sweeps.run_sweep(exp, str(tmp_path), seeds=[0, 1], scale="tiny", name="t4",
                         pretrain_fn=fake_pretrain, transfer_fn=fake_transfer)
  assert len(set(pretrained)) == 2 * 2  # USFM and the SimMIM-style (nofreq) pretraining, per seed
  assert len(transferred) == 4 * 3 * 2
  assert [(r["organ"], r["method"]) for r in res["rows"][:3]] == [
      ("thyroid", "CycleGAN"), ("thyroid", "+ SimMIM-style features"), ("thyroid", "+ USFM features")]
  md = (tmp_path / "t4.md").read_text()
  assert "| ssim | lncc | nmi_sym | nmi |" in md and md.count("\n| kidney |") == 3
