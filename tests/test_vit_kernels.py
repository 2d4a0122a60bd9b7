"""The hand-written pieces of the ViT (LayerNorm and GELU with custom backward passes, the CPU
attention, the flattened matmul) against PyTorch, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mae_jax.models import vit


def _t(a):
  return torch.from_numpy(np.asarray(a, np.float64)).requires_grad_(True)


@pytest.mark.parametrize("shape", [(2, 5, 24), (7, 16)])
def test_layer_norm_matches_torch(shape):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
  scale = rng.normal(size=shape[-1]).astype(np.float32)
  bias = rng.normal(size=shape[-1]).astype(np.float32)
  dy = rng.normal(size=shape).astype(np.float32)

  y, grads = jax.value_and_grad(
      lambda x, s, b: jnp.sum(vit.layer_norm(x, s, b, 1e-6) * dy), argnums=(0, 1, 2))(x, scale, bias)
  tx, ts, tb = _t(x), _t(scale), _t(bias)
  ty = torch.nn.functional.layer_norm(tx, (shape[-1],), ts, tb, eps=1e-6)
  tl = (ty * torch.from_numpy(dy.astype(np.float64))).sum()
  tl.backward()
  np.testing.assert_allclose(float(y), tl.item(), rtol=1e-5, atol=1e-4)
  for g, t in zip(grads, (tx, ts, tb)):
    np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_norm_module_keeps_nnx_parameters():
  ln = vit.LayerNorm(8, epsilon=1e-6, rngs=nnx.Rngs(0))
  ref = nnx.LayerNorm(8, epsilon=1e-6, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(ln)) == jax.tree.structure(nnx.state(ref))
  x = jax.random.normal(jax.random.key(0), (3, 8)) * 5
  np.testing.assert_allclose(np.asarray(ln(x)), np.asarray(ref(x)), atol=1e-5)


def test_gelu_matches_torch_erf_gelu():
  x = np.linspace(-8, 8, 1001).astype(np.float32)
  y, g = jax.vmap(jax.value_and_grad(vit.gelu_exact))(x)
  tx = _t(x)
  ty = torch.nn.functional.gelu(tx)  # exact (erf) GELU
  ty.sum().backward()
  np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), atol=2e-6)
  np.testing.assert_allclose(np.asarray(g), tx.grad.numpy(), atol=2e-6)


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
  """The written-out backward keeps the input dtype for the gradient and float32 inside."""
  rng = np.random.default_rng(2)
  qkv = rng.normal(size=(2, 13, 3, 2, 8)).astype(np.float32)
  dy = rng.normal(size=(2, 13, 2, 8)).astype(np.float32)
  f = lambda a: jnp.sum(vit.attention(a).astype(jnp.float32) * dy)
  g32 = jax.grad(f)(jnp.asarray(qkv))
  g16 = jax.grad(f)(jnp.asarray(qkv, jnp.bfloat16))
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32), atol=0.06, rtol=0.05)


def test_matmul_2d_equals_dot_general():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  w = jax.random.normal(jax.random.key(1), (4, 6))
  dn = (((3,), (0,)), ((), ()))
  np.testing.assert_allclose(np.asarray(vit.matmul_2d(x, w, dn)),
                             np.asarray(jax.lax.dot_general(x, w, dn)), rtol=1e-6, atol=1e-6)
  gx = jax.grad(lambda x: jnp.sum(vit.matmul_2d(x, w, dn) ** 2))(x)
  gr = jax.grad(lambda x: jnp.sum(jax.lax.dot_general(x, w, dn) ** 2))(x)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(gr), rtol=1e-5, atol=1e-5)
