"""The ViT's layers (LayerNorm, exact GELU, `vit.attention` through jax.nn.dot_product_attention)
against PyTorch, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mae_jax.models import vit


def _t(a):
  return torch.from_numpy(np.asarray(a, np.float64)).requires_grad_(True)


def test_block_layers_match_torch():
  """The block's LayerNorm (two-pass variance) and exact GELU against torch in float64."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(2, 5, 24)) * 3 + 2).astype(np.float32)
  ln = vit._norm(24, dtype=jnp.float32, rngs=nnx.Rngs(0))
  ln.scale[...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  ln.bias[...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  ty = torch.nn.functional.layer_norm(_t(x), (24,), _t(ln.scale[...]), _t(ln.bias[...]), eps=1e-6)
  np.testing.assert_allclose(np.asarray(ln(x)), ty.detach().numpy(), atol=2e-5)
  g = np.linspace(-8, 8, 1001).astype(np.float32)
  y = jax.nn.gelu(g, approximate=False)
  np.testing.assert_allclose(np.asarray(y), torch.nn.functional.gelu(_t(g)).detach().numpy(), atol=2e-6)


@pytest.mark.parametrize("b,t,h,hd", [(2, 9, 3, 8), (1, 17, 2, 16)])
def test_attention_matches_torch_sdpa(b, t, h, hd):
  rng = np.random.default_rng(1)
  qkv = (rng.normal(size=(b, t, 3, h, hd)) * 2).astype(np.float32)
  dy = rng.normal(size=(b, t, h, hd)).astype(np.float32)
  out, g = jax.value_and_grad(lambda a: jnp.sum(vit.attention(a) * dy))(qkv)
  tqkv = _t(qkv)
  q, k, v = (tqkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, hd)
  to = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
  tl = (to * torch.from_numpy(dy.astype(np.float64))).sum()
  tl.backward()
  np.testing.assert_allclose(float(out), tl.item(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(g), tqkv.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_attention_in_bfloat16_follows_float32():
  """bfloat16 inputs: the gradient keeps the input dtype, logits and softmax stay float32 inside."""
  rng = np.random.default_rng(2)
  qkv = rng.normal(size=(2, 13, 3, 2, 8)).astype(np.float32)
  dy = rng.normal(size=(2, 13, 2, 8)).astype(np.float32)
  f = lambda a: jnp.sum(vit.attention(a).astype(jnp.float32) * dy)
  g32 = jax.grad(f)(jnp.asarray(qkv))
  g16 = jax.grad(f)(jnp.asarray(qkv, jnp.bfloat16))
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32), atol=0.06, rtol=0.05)
