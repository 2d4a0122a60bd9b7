"""model.scan_layers and model.remat change how the blocks run, not what they compute: loss and
every gradient equal the plain per-block loop's (the scanned parameters mapped to the per-block
layout by `vit.unstack_blocks`), and export, weight loading and downstream heads read both layouts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax import export
from mae_jax.models import beit
from mae_jax.models import heads
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit

SPEC = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=32, depth=3, num_heads=2)


def _mae(spec, **kw):
  return mae_lib.MAE(spec, decoder_width=32, decoder_depth=2, decoder_heads=2, norm_pix_loss=True,
                     rngs=nnx.Rngs(0), **kw)


def _beit_mae(spec):
  enc = beit.Encoder(spec, options=beit.BeitOptions(shared_rel_pos=False), drop_path_rate=0.3,
                     rngs=nnx.Rngs(1))
  return _mae(spec, encoder=enc)


def _inputs():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 32, 32, 1)), jnp.float32)
  noise = jnp.asarray(rng.uniform(size=(3, SPEC.num_patches)), jnp.float32)
  return images, noise


def _loss_and_grads(model, return_pred):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images, noise = _inputs()

  def loss_fn(p):
    m = nnx.merge(graphdef, p, rest)
    return m(images, noise=noise, return_pred=return_pred)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  return float(loss), vit.unstack_blocks(nnx.to_pure_dict(grads))


def _assert_trees_close(a, b, atol):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol, err_msg=str(path))


_BUILDERS = {"vit": _mae, "beit": _beit_mae}


@functools.cache
def _plain(build: str, return_pred: bool):
  """The per-block model's initial state, loss and gradients: the reference of every layout (each
  compile of the gradient costs seconds on CPU, so it is made once per model and decoder form)."""
  ref = _BUILDERS[build](SPEC)
  return nnx.to_pure_dict(nnx.state(ref)), *_loss_and_grads(ref, return_pred)


# Every scan/remat setting on both encoders with the masked decoder tail (the training form); the
# full decoder (the figures' form) differs only after the decoder blocks, so one setting covers it.
@pytest.mark.parametrize("return_pred,build,scan,remat", [
    *[(False, b, scan, remat) for b in ("vit", "beit")
      for scan, remat in ((True, "none"), (False, "full"), (True, "full"),
                          (True, "dots_with_no_batch_dims_saveable"))],
    (True, "vit", True, "full"), (True, "beit", True, "dots_with_no_batch_dims_saveable")])
def test_scan_and_remat_give_the_plain_loss_and_gradients(return_pred, build, scan, remat):
  state0, loss0, g0 = _plain(build, return_pred)
  run = _BUILDERS[build](dataclasses.replace(SPEC, scan_layers=scan, remat=remat))
  assert vit.is_scanned(run.encoder.blocks) == scan and vit.is_scanned(run.decoder_blocks) == scan
  # The same initial values in either layout (blocks built one by one, then stacked).
  _assert_trees_close(vit.unstack_blocks(nnx.to_pure_dict(nnx.state(run))), state0, 0)
  loss1, g1 = _loss_and_grads(run, return_pred)
  assert abs(loss0 - loss1) <= 1e-6
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g0["encoder"]["blocks"]))
  _assert_trees_close(g1, g0, 1e-6)


@pytest.mark.parametrize("make", ["vit", "beit"])
def test_stochastic_depth_differs_per_block_under_scan(make):
  """With a drop-path key the scanned encoder equals the per-block loop (each block its own rate of
  the linear ramp 0 … 0.5, its own key), and differs from one rate for all blocks."""
  spec = dataclasses.replace(SPEC, depth=4)

  def build(s):
    if make == "vit":
      return vit.Encoder(s, drop_path_rate=0.5, rngs=nnx.Rngs(0))
    return beit.Encoder(s, drop_path_rate=0.5, rngs=nnx.Rngs(0))

  images, _ = _inputs()
  images = jnp.concatenate([images] * 6)  # 18 samples: some dropped in every block
  key = jax.random.key(3)
  ref, run = build(spec), build(dataclasses.replace(spec, scan_layers=True))
  assert run.drop_path_rates == ref.drop_path_rates and len(set(ref.drop_path_rates)) == 4
  out0 = ref(images, key=key)
  out1 = run(images, key=key)
  # x / keep by a traced keep (scan) vs a Python float: the same quotient up to XLA's rewriting.
  np.testing.assert_allclose(np.asarray(out1), np.asarray(out0), atol=1e-5)
  run.drop_path_rates = (0.5,) * 4
  assert np.abs(np.asarray(run(images, key=key)) - np.asarray(out0)).max() > 1e-3


def test_layout_round_trip_and_weight_loading_across_layouts():
  plain = _mae(SPEC)
  scanned = _mae(dataclasses.replace(SPEC, scan_layers=True))
  flat = nnx.to_pure_dict(nnx.state(plain))
  stacked = nnx.to_pure_dict(nnx.state(scanned))
  assert sorted(stacked["encoder"]["blocks"]) != list(range(SPEC.depth))
  assert stacked["encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape == (SPEC.depth, 32, 96)
  _assert_trees_close(vit.stack_blocks(flat), stacked, 0)
  _assert_trees_close(vit.unstack_blocks(stacked), flat, 0)
  # Orbax gives the block indices back as strings: those stack too.
  str_keys = {**flat, "encoder": {**flat["encoder"], "blocks": {str(k): v for k, v in flat["encoder"]["blocks"].items()}}}
  _assert_trees_close(vit.stack_blocks(str_keys)["encoder"], stacked["encoder"], 0)
  # A scanned encoder's weights load into a per-block one (and back), e.g. pretrain -> finetune.
  src = dict(vit.unstack_blocks(stacked)["encoder"])
  dst = vit.Encoder(SPEC, rngs=nnx.Rngs(5))
  vit.load_weights(dst, nnx.to_pure_dict(nnx.state(scanned.encoder)), drop_path=0.1, full_depth=SPEC.depth)
  _assert_trees_close(nnx.to_pure_dict(nnx.state(dst)), src, 0)
  assert [b.drop_path_rate for b in dst.blocks] == list(dst.drop_path_rates) == [0.0, 0.05, 0.1]
  back = vit.Encoder(dataclasses.replace(SPEC, scan_layers=True), rngs=nnx.Rngs(5))
  vit.load_weights(back, nnx.to_pure_dict(nnx.state(dst)), drop_path=0.0, full_depth=SPEC.depth)
  _assert_trees_close(nnx.to_pure_dict(nnx.state(back)), stacked["encoder"], 0)


def test_export_and_heads_read_the_scanned_layout():
  plain = _mae(SPEC)
  scanned = _mae(dataclasses.replace(SPEC, scan_layers=True))
  a, b = export.mae_state_dict(plain), export.mae_state_dict(scanned)
  assert sorted(a) == sorted(b) and "blocks.2.attn.qkv.weight" in a and "decoder_blocks.1.mlp.fc2.bias" in a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  images, _ = _inputs()
  for kind in ("finetune", "linear_probe"):
    c0 = heads.from_pretrained(plain, 3, kind=kind)
    c1 = heads.from_pretrained(scanned, 3, kind=kind)
    np.testing.assert_allclose(np.asarray(c1(images)), np.asarray(c0(images)), atol=1e-6)
  e0 = export.encoder_state_dict(heads.from_pretrained(plain, 3).encoder)
  e1 = export.encoder_state_dict(heads.from_pretrained(scanned, 3).encoder)
  for k in e0:
    np.testing.assert_array_equal(e0[k], e1[k], err_msg=k)


def test_remat_names_are_checked():
  with pytest.raises(ValueError, match="model.remat='dots'"):
    vit.ViTSpec(remat="dots")
  with pytest.raises(ValueError, match="model.attention='flash'"):
    vit.ViTSpec(attention="flash")
  assert vit.remat_policy("none") == (False, None) and vit.remat_policy("full") == (True, None)
  assert vit.remat_policy("dots_saveable")[1] is jax.checkpoint_policies.dots_saveable


def test_downstream_copies_change_the_layout():
  """Pretrained scanned, fine-tuned per block (and the reverse): the same logits and features."""
  from mae_jax.models import upernet
  plain = _mae(SPEC)
  scanned = _mae(dataclasses.replace(SPEC, scan_layers=True))
  images, _ = _inputs()
  c0 = heads.from_pretrained(plain, 3, run={"scan_layers": True, "remat": "full"})
  c1 = heads.from_pretrained(scanned, 3, run={"scan_layers": False})
  assert vit.is_scanned(c0.encoder.blocks) and not vit.is_scanned(c1.encoder.blocks)
  np.testing.assert_allclose(np.asarray(c0(images)), np.asarray(c1(images)), atol=1e-6)
  s0 = upernet.from_pretrained(plain, 2, channels=8, norm_groups=4, blocks=(1, 1, 2, 3),
                               run={"scan_layers": True})
  s1 = upernet.from_pretrained(scanned, 2, channels=8, norm_groups=4, blocks=(1, 1, 2, 3))
  for a, b in zip(s0.features(images), s1.features(images)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(ValueError, match="only attention, remat and scan_layers"):
    heads.from_pretrained(plain, 3, run={"width": 8})


def test_optimizer_rules_follow_the_block_layout():
  """AdamW's weight-decay mask (biases and norm scales exempt) and fine-tuning's layer-wise lr decay
  treat a scanned stack slice by slice: one step gives the per-block layout's updates."""
  from mae_jax.train import core, lr_decay, optim

  def step(tx, params):
    grads = jax.tree.map(lambda x: 0.3 * x + 0.1, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return vit.unstack_blocks(updates)

  plain = _mae(SPEC)
  scanned = _mae(dataclasses.replace(SPEC, scan_layers=True))
  p0 = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  p1 = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  tx = optim.adamw(lambda s: 1e-2, b1=0.9, b2=0.95, weight_decay=0.5)
  _assert_trees_close(step(tx, p1), step(tx, p0), 1e-7)
  q0 = nnx.to_pure_dict(nnx.state(heads.from_pretrained(plain, 3), nnx.Param))
  q1 = nnx.to_pure_dict(nnx.state(heads.from_pretrained(scanned, 3), nnx.Param))
  make = lambda q: lr_decay.layerwise_adamw(lambda s: 1e-2, q, depth=SPEC.depth, layer_decay=0.5,  # noqa: E731
                                            weight_decay=0.5)
  u0, u1 = step(make(q0), q0), step(make(q1), q1)
  _assert_trees_close(u1, u0, 1e-7)
  # The decay really differs per block (else the check above could not tell the slices apart).
  k = [np.abs(np.asarray(u0["encoder"]["blocks"][i]["norm1"]["bias"])).max() for i in range(SPEC.depth)]
  assert k[0] < k[1] < k[2]
