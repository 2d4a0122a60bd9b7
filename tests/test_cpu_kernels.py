"""mae_jax.cpu_kernels: the CPU custom calls (sgemm matmul, fused attention) against references.

References: float64 numpy products (closed form) for the matmul and its gradients, torch's
scaled_dot_product_attention for the attention's values and gradients, and the model's own XLA
path for a whole MAE step (same loss and gradients with the kernels on and off).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from mae_jax import cpu_kernels
from mae_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _built():
  reason = cpu_kernels.load()
  assert reason is None, f"the kernels must build on the CI machine (g++ and numpy's BLAS): {reason}"
  assert cpu_kernels.enabled()


# Cut by output rows, by output columns, a long contraction (the weight-gradient shape), degenerate.
@pytest.mark.parametrize("m,k,n", [(130, 64, 7), (37, 19, 23), (5, 300, 130), (16, 1000, 24), (1, 1, 1)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_every_transpose_against_float64(m, k, n, trans_a, trans_b):
  rng = np.random.default_rng(m * 1000 + k + n)
  a = rng.standard_normal((m, k)).astype(np.float32)
  b = rng.standard_normal((k, n)).astype(np.float32)
  want = a.astype(np.float64) @ b.astype(np.float64)
  got = jax.jit(lambda x, y: cpu_kernels.matmul(x, y, trans_a=trans_a, trans_b=trans_b))(
      a.T.copy() if trans_a else a, b.T.copy() if trans_b else b)
  assert got.shape == (m, n)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("wrt", [(0, 1), (0,), (1,)])
def test_dense_gradients_against_float64(wrt):
  """dx = dy·wᵀ and dw = xᵀ·dy, each one sgemm call, and only the one that is wanted (the patch
  embedding's pixels need no gradient)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((70, 33)).astype(np.float32)
  w = rng.standard_normal((33, 150)).astype(np.float32)
  dy = rng.standard_normal((70, 150)).astype(np.float32)
  x64, w64, dy64 = (v.astype(np.float64) for v in (x, w, dy))
  loss = lambda x, w: jnp.sum(cpu_kernels.dense(x, w) * dy)  # d loss / d y = dy
  grads = jax.jit(jax.grad(loss, argnums=wrt))
  want = {0: dy64 @ w64.T, 1: x64.T @ dy64}
  for i, got in zip(wrt, grads(x, w)):
    np.testing.assert_allclose(np.asarray(got), want[i], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(jax.jit(cpu_kernels.dense)(x, w)), x64 @ w64, rtol=1e-5, atol=1e-4)
  hlo = grads.lower(x, w).as_text()
  # The loss is linear in y, so the forward product is dead code: only the backward's calls remain.
  assert hlo.count("mae_jax_MaeMatmul") == len(wrt)


def _torch_attention(qkv, dout):
  """torch's scaled_dot_product_attention in float64: the reference without float32 rounding."""
  t = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
  q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))
  out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
  out.backward(torch.tensor(dout, dtype=torch.float64))
  return out.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("b,t,h,hd", [(2, 197, 8, 32), (3, 50, 6, 64), (1, 1, 2, 8), (2, 17, 3, 5)])
def test_attention_values_and_gradients_against_torch(b, t, h, hd):
  rng = np.random.default_rng(t + hd)
  qkv = (2 * rng.standard_normal((b, t, 3, h, hd))).astype(np.float32)
  dout = rng.standard_normal((b, t, h, hd)).astype(np.float32)
  out, vjp = jax.vjp(lambda x: cpu_kernels.attention(x, hd ** -0.5), jnp.asarray(qkv))
  (dqkv,) = vjp(jnp.asarray(dout))
  want_out, want_grad = _torch_attention(qkv, dout)
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dqkv), want_grad, rtol=1e-4, atol=2e-5)


def test_attention_softmax_survives_large_logits():
  """Logits in the hundreds: the max-subtracted exp must neither overflow nor lose the argmax."""
  rng = np.random.default_rng(1)
  qkv = (30 * rng.standard_normal((1, 40, 3, 2, 16))).astype(np.float32)
  dout = rng.standard_normal((1, 40, 2, 16)).astype(np.float32)
  out, vjp = jax.vjp(lambda x: cpu_kernels.attention(x, 16 ** -0.5), jnp.asarray(qkv))
  (dqkv,) = vjp(jnp.asarray(dout))
  want_out, want_grad = _torch_attention(qkv, dout)
  assert np.isfinite(np.asarray(dqkv)).all()
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dqkv), want_grad, rtol=1e-3, atol=1e-3)


def test_model_takes_the_kernels_and_matches_the_xla_path(monkeypatch):
  """The ViT's Linear layers and attention become custom calls, and a forward + backward through
  a transformer block gives XLA's numbers (the kernels change how, not what)."""
  from flax import nnx
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 20, 32)).astype(np.float32))

  def loss_and_grads():
    block = vit.Block(32, 4, 4.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(block)
    f = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2), argnums=(0, 1)))
    return f, params

  monkeypatch.setenv(cpu_kernels.ENV, "on")
  f_on, params = loss_and_grads()
  hlo_on = f_on.lower(params, x).compile().as_text()
  (l_on, (g_on, gx_on)) = f_on(params, x)
  monkeypatch.setenv(cpu_kernels.ENV, "off")
  f_off, _ = loss_and_grads()
  hlo_off = f_off.lower(params, x).compile().as_text()
  (l_off, (g_off, gx_off)) = f_off(params, x)
  assert "mae_jax_MaeMatmul" in hlo_on and "mae_jax_MaeAttentionFwd" in hlo_on
  assert "mae_jax_MaeAttentionBwd" in hlo_on
  assert "mae_jax_Mae" not in hlo_off
  np.testing.assert_allclose(float(l_on), float(l_off), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx_on), np.asarray(gx_off), rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_vmap_runs_the_kernels_per_example():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 5, 7)).astype(np.float32)
  w = rng.standard_normal((7, 4)).astype(np.float32)
  got = jax.vmap(cpu_kernels.dense, in_axes=(0, None))(x, w)
  np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
  qkv = rng.standard_normal((2, 1, 6, 3, 2, 4)).astype(np.float32)
  got = jax.vmap(lambda q: cpu_kernels.attention(q, 0.5))(qkv)
  want = np.stack([_torch_attention(q, np.zeros((1, 6, 2, 4), np.float32))[0] for q in qkv])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_keeps_xla_kernels():
  """Only float32 takes the custom calls (bf16 is the accelerator path)."""
  from flax import nnx
  block = vit.Block(32, 4, 4.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 10, 32), jnp.bfloat16)
  hlo = jax.jit(lambda x: block(x)).lower(x).compile().as_text()
  assert "mae_jax_Mae" not in hlo


def _python(code: str, env: dict, tmp_path) -> subprocess.CompletedProcess:
  full = {**os.environ, "PYTHONPATH": REPO, **env}
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                        cwd=tmp_path, timeout=600)


def test_without_a_compiler_the_model_keeps_xla_and_says_why(tmp_path):
  code = ("import logging; logging.basicConfig()\n"
          "from mae_jax import cpu_kernels\n"
          "assert not cpu_kernels.enabled()\n"
          "print('REASON', cpu_kernels.load())\n")
  done = _python(code, {"MAE_JAX_CACHE": str(tmp_path / "cache"), "CXX": "/bin/false"}, tmp_path)
  assert done.returncode == 0, done.stderr
  assert "REASON RuntimeError" in done.stdout and "/bin/false" in done.stdout
  assert "mae_jax.cpu_kernels not used" in done.stderr


def test_openblas_fallback_and_sharded_meshes(tmp_path):
  """numpy's OpenBLAS gives the same products; with 8 (fake) devices the kernels stay off, since a
  custom call has no sharding rule."""
  code = ("import numpy as np, jax\n"
          "from mae_jax import cpu_kernels\n"
          "assert cpu_kernels.load() is None and cpu_kernels._BLAS['name'] == 'OpenBLAS'\n"
          "a = np.random.default_rng(0).standard_normal((33, 17)).astype(np.float32)\n"
          "got = np.asarray(cpu_kernels.matmul(a, a, trans_b=True))\n"
          "np.testing.assert_allclose(got, a.astype(np.float64) @ a.T, rtol=1e-5, atol=1e-4)\n"
          "print('OK')\n")
  done = _python(code, {"MAE_JAX_CPU_BLAS": "openblas"}, tmp_path)
  assert done.returncode == 0 and "OK" in done.stdout, done.stderr
  code = ("import jax\nfrom mae_jax import cpu_kernels\n"
          "assert jax.device_count() == 8 and not cpu_kernels.enabled()\nprint('OFF')\n")
  done = _python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, tmp_path)
  assert done.returncode == 0 and "OFF" in done.stdout, done.stderr
