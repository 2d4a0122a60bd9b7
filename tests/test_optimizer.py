"""The optimizer step (`optim.adamw` + `core.apply_if_finite`) against torch.optim.AdamW with MAE's
parameter groups (no weight decay on 1-D parameters), and the skip of a non-finite step, in both
forms of the skip (`lax.cond` on CPU, per-leaf `where` on accelerators)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mae_jax.train import core, optim

B1, B2, WD, LR, STEPS = 0.9, 0.95, 0.05, 1e-2, 4


def _params(rng):
  return {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32),
          "blk": {"k": rng.normal(size=(2, 4, 3)).astype(np.float32)}}


def _torch_run(params, grads_per_step):
  tp = {k: torch.tensor(v, requires_grad=True) for k, v in
        [("w", params["w"]), ("b", params["b"]), ("k", params["blk"]["k"])]}
  opt = torch.optim.AdamW([{"params": [tp["w"], tp["k"]], "weight_decay": WD},
                           {"params": [tp["b"]], "weight_decay": 0.0}], lr=LR, betas=(B1, B2), eps=1e-8)
  for g in grads_per_step:
    for name, grad in [("w", g["w"]), ("b", g["b"]), ("k", g["blk"]["k"])]:
      tp[name].grad = torch.tensor(grad)
    opt.step()
  return {"w": tp["w"].detach().numpy(), "b": tp["b"].detach().numpy(),
          "blk": {"k": tp["k"].detach().numpy()}}


@pytest.mark.parametrize("branch", [True, False])
def test_adamw_matches_torch_and_skips_non_finite(branch):
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
           for _ in range(STEPS)]
  tx = optim.adamw(lambda step: LR, b1=B1, b2=B2, weight_decay=WD)
  step = jax.jit(lambda s, g, loss: core.apply_if_finite(s, g, loss, tx, branch=branch))
  state = core.init_state(jax.tree.map(jnp.asarray, params), tx, seed=0)

  for i, g in enumerate(grads):
    state, gnorm, ok = step(state, g, jnp.float32(1.0))
    assert bool(ok)
    expect = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(gnorm), expect, rtol=1e-5)
    if i == 1:  # a non-finite loss, then a non-finite gradient, between the real steps: no-ops
      before = jax.tree.map(np.asarray, (state.params, state.opt_state))
      state, _, ok_loss = step(state, g, jnp.float32(np.nan))
      bad = jax.tree.map(lambda x: x.copy(), g)
      bad["blk"]["k"][0, 0, 0] = np.inf
      state, _, ok_grad = step(state, bad, jnp.float32(1.0))
      assert not bool(ok_loss) and not bool(ok_grad)
      after = jax.tree.map(np.asarray, (state.params, state.opt_state))
      for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
  assert int(state.step) == STEPS + 2 and int(state.skipped) == 2 and int(state.bad_steps) == 0

  # The two skipped steps did not advance Adam's bias correction: torch saw only the real steps.
  ref = _torch_run(params, grads)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
