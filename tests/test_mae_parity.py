"""Our MAE against transformers' ViTMAEForPreTraining (numerically identical to the official model)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mae_jax import export
from mae_jax import patches as patch_lib
from mae_jax.corrupt import masking
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit
from tests import torch_refs

DEC = dict(decoder_width=32, decoder_depth=2, decoder_heads=4)


def _models(spec, norm_pix, mask_ratio=0.75, seed=0):
  model = mae_lib.MAE(spec, mask_ratio=mask_ratio, norm_pix_loss=norm_pix, rngs=nnx.Rngs(seed), **DEC)
  ref = torch_refs.hf_vitmae(spec, mask_ratio=mask_ratio, norm_pix_loss=norm_pix, **DEC)
  ref.load_state_dict(torch_refs.official_to_hf(export.mae_state_dict(model)), strict=True)
  return model, ref


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("in_chans,image_size,patch", [(1, 32, 8), (3, 24, 4)])
def test_loss_and_prediction_match_transformers(norm_pix, in_chans, image_size, patch):
  spec = vit.ViTSpec(image_size=image_size, patch_size=patch, in_chans=in_chans, width=48, depth=2,
                     num_heads=4)
  model, ref = _models(spec, norm_pix)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, image_size, image_size, in_chans)).astype(np.float32)
  noise = rng.uniform(size=(3, spec.num_patches)).astype(np.float32)

  loss, pred, mask = model(jnp.asarray(images), noise=jnp.asarray(noise))
  with torch.no_grad():
    out = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
  assert abs(float(loss) - out.loss.item()) <= 1e-5
  np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(mask), out.mask.numpy())


def test_position_table_closed_form():
  d, h, w = 16, 3, 5
  table = vit.sincos_2d(d, (h, w), num_prefix=1)
  assert table.shape == (1 + h * w, d)
  np.testing.assert_array_equal(table[0], 0)
  # Closed form of MAE's table: channels [0, d/2) encode the column, [d/2, d) the row;
  # within each half, sin for the first d/4 channels and cos for the rest, with w_k = 1e4^(-k/(d/4)).
  q = d // 4
  for r in range(h):
    for c in range(w):
      row = table[1 + r * w + c]
      for k in range(q):
        om = 10000.0 ** (-k / q)
        assert row[k] == pytest.approx(np.sin(c * om), abs=1e-6)
        assert row[q + k] == pytest.approx(np.cos(c * om), abs=1e-6)
        assert row[2 * q + k] == pytest.approx(np.sin(r * om), abs=1e-6)
        assert row[3 * q + k] == pytest.approx(np.cos(r * om), abs=1e-6)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_kept_patches_per_sample(ratio):
  n, length, d = 4, 49, 3
  x = jnp.arange(n * length * d, dtype=jnp.float32).reshape(n, length, d)
  noise = jax.random.uniform(jax.random.key(1), (n, length))
  kept, mask, ids_restore = masking.random_masking(x, ratio, noise)
  keep = int(length * (1 - ratio))
  assert kept.shape == (n, keep, d)
  np.testing.assert_array_equal(np.asarray(mask.sum(1)), length - keep)
  # The kept tokens are exactly those with the smallest noise, and ids_restore inverts the shuffle.
  order = np.argsort(np.asarray(noise), axis=1)
  np.testing.assert_array_equal(np.asarray(kept[..., 0]) // d % length, order[:, :keep])
  np.testing.assert_array_equal(np.take_along_axis(order, np.asarray(ids_restore), 1),
                                np.broadcast_to(np.arange(length), (n, length)))


def test_patchify_roundtrip_and_order():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 12, 8, 3)).astype(np.float32)
  tok = patch_lib.patchify(jnp.asarray(images), 4)
  assert tok.shape == (2, 6, 48)
  # token 3 is grid row 1, col 1; inside it (row, col, channel) with channel fastest.
  np.testing.assert_array_equal(np.asarray(tok[1, 3]), images[1, 4:8, 4:8, :].reshape(-1))
  back = patch_lib.unpatchify(tok, 4, (3, 2), 3)
  np.testing.assert_array_equal(np.asarray(back), images)


def test_init_statistics_follow_mae():
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=64, depth=1, num_heads=4)
  model = mae_lib.MAE(spec, rngs=nnx.Rngs(0), **DEC)
  qkv = np.asarray(model.encoder.blocks[0].attn.qkv.kernel[...])
  bound = np.sqrt(6.0 / (64 + 192))  # xavier_uniform on the fused [D, 3D] matrix
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  np.testing.assert_array_equal(np.asarray(model.encoder.blocks[0].attn.qkv.bias[...]), 0)
  assert np.asarray(model.encoder.cls_token[...]).std() == pytest.approx(0.02, rel=0.5)


@pytest.mark.parametrize("in_chans,patch", [(1, 16), (3, 8)])
def test_patch_embedding_bias_keeps_torch_conv2d_default_init(in_chans, patch):
  """facebookresearch/mae re-initialises the patch conv's weight (xavier on its matrix view) but not
  its bias, which keeps torch Conv2d's default U(±1/√(C·p²))."""
  from scipy import stats
  width = 1024
  torch.manual_seed(0)  # a fixed draw: the two-sample test must not depend on the tests run before
  conv = torch.nn.Conv2d(in_chans, width, kernel_size=patch, stride=patch)
  fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(conv.weight)
  bound = 1.0 / np.sqrt(fan_in)
  tb = conv.bias.detach().numpy()
  assert np.abs(tb).max() <= bound and np.abs(tb).max() > 0.95 * bound  # torch's own draw
  spec = vit.ViTSpec(image_size=2 * patch, patch_size=patch, in_chans=in_chans, width=width, depth=0,
                     num_heads=1)
  bias = np.asarray(vit.PatchEmbed(spec, dtype=jnp.float32, rngs=nnx.Rngs(0)).proj.bias[...])
  assert bias.shape == (width,) and bias.dtype == np.float32
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.95 * bound
  assert np.count_nonzero(bias) == width
  assert stats.kstest(bias / bound, "uniform", args=(-1, 2)).pvalue > 0.01
  assert stats.ks_2samp(bias, tb).pvalue > 0.01  # the same law as torch's draw
  # and the MAE model's encoder carries it (the other Linear biases stay zero)
  model = mae_lib.MAE(vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=64, depth=1,
                                  num_heads=4), rngs=nnx.Rngs(0), **DEC)
  b = np.asarray(model.encoder.patch_embed.proj.bias[...])
  assert np.count_nonzero(b) == 64 and np.abs(b).max() <= 1 / 8


@pytest.mark.parametrize("norm_pix", [False, True])
def test_training_form_gives_the_official_loss_and_gradients(norm_pix):
  """`return_pred=False` (the train step's call) runs the decoder's last block, norm and head on the
  masked tokens only; the loss and every parameter's gradient still equal the official model's
  (benchmarks/official_mae_peer.py, timm blocks, autograd in torch)."""
  import torch

  spec, model, sd, peer = torch_refs.micro_mae_and_official_peer(decoder_depth=2, norm_pix=norm_pix,
                                                                 seed=3)
  peer.load_state_dict(sd, strict=True)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(3, 32, 32, 1)).astype(np.float32)
  noise = rng.uniform(size=(3, spec.num_patches)).astype(np.float32)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  def loss_fn(params, return_pred):
    out = nnx.merge(graphdef, params, rest)(jnp.asarray(images), noise=jnp.asarray(noise),
                                            return_pred=return_pred)
    assert (out[1] is None) == (not return_pred)
    return out[0]
  loss, grads = jax.value_and_grad(loss_fn)(params, False)
  assert abs(float(loss) - float(loss_fn(params, True))) <= 1e-6
  # The head really runs on the 3 × 12 masked tokens: its product is (3, 12, 64), not (3, 16, 64).
  text = str(jax.make_jaxpr(lambda p: loss_fn(p, False))(params))
  assert re.search(r"f32\[3,12,64\] = dot_general", text) and not re.search(r"f32\[3,16,64\] = dot_general", text)

  t_loss = peer(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), noise=torch.from_numpy(noise))[0]
  t_loss.backward()
  assert abs(float(loss) - t_loss.item()) <= 1e-5
  ours = export.mae_state_dict(nnx.merge(graphdef, grads, rest))  # gradients under torch's names
  checked = 0
  for name, p in peer.named_parameters():
    if p.grad is None:
      continue
    want = p.grad.numpy()
    np.testing.assert_allclose(ours[name], want, atol=1e-5 + 1e-4 * np.abs(want).max(), err_msg=name)
    checked += 1
  assert checked >= 30
