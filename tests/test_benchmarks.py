"""The benchmarks do not rot: the FLOP formula against its closed form and against the matmuls the
model really traces, and both CLIs on a micro configuration (no timing is checked)."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import flops
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vit_b_mae_closed_form():
  # ViT-B/16 at 224 px, RGB, decoder 512 x 8: L = 196, K = 49, P = 768.
  f = flops.mae_forward_flops(image_size=224, patch_size=16, in_chans=3, width=768, depth=12,
                              decoder_width=512, decoder_depth=8, mask_ratio=0.75)
  enc_block = 24 * 50 * 768**2 + 4 * 50**2 * 768
  dec_block = 24 * 197 * 512**2 + 4 * 197**2 * 512
  closed = (2 * 196 * 768 * 768 + 12 * enc_block + 2 * 50 * 768 * 512 + 8 * dec_block
            + 2 * 197 * 512 * 768)
  assert f == closed
  assert 3 * f / 1e9 == pytest.approx(58.7, abs=0.05)
  # The physical limit of issue 9: one H100 at 989 TFLOP/s dense bf16.
  assert flops.PEAK_FLOPS["H100"] / (3 * f) == pytest.approx(16_900, rel=0.01)
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("cpu") is None


def _dot_flops(jaxpr) -> float:
  """2·(batch)·M·N·K summed over every dot_general of a (closed) jaxpr, sub-jaxprs included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), (lb, _) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      out = eqn.outvars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in lc])
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _dot_flops(sub)
  return total


@pytest.mark.parametrize("blur_embed", ["none", "token"])
def test_formula_counts_the_traced_matmuls(blur_embed):
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=3, width=32, depth=2, num_heads=2)
  model = mae_lib.MAE(spec, decoder_width=16, decoder_depth=1, decoder_heads=2, mask_ratio=0.75,
                      blur_embed=blur_embed, rngs=nnx.Rngs(0))
  images = jnp.zeros((2, 32, 32, 3))
  kw = {"blur_t": jnp.ones((2,), jnp.int32)} if blur_embed == "token" else {}
  jaxpr = jax.make_jaxpr(lambda x: model(x, key=jax.random.key(0), **kw)[0])(images)
  prefix = 2 if blur_embed == "token" else 1
  f = flops.mae_forward_flops(image_size=32, patch_size=8, in_chans=3, width=32, depth=2,
                              decoder_width=16, decoder_depth=1, mask_ratio=0.75, num_prefix=prefix)
  # The formula counts the official model, which embeds all L patches (ours embeds the K kept ones)
  # and runs the head on the prefix tokens too before dropping them (ours drops them first).
  saved = 2.0 * (16 - 4) * (8 * 8 * 3) * 32 + 2.0 * prefix * 16 * (8 * 8 * 3)
  assert _dot_flops(jaxpr.jaxpr) / 2 == f - saved  # / 2: a batch of two images


def test_simmim_formula_counts_the_traced_matmuls():
  spec = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=32, depth=2, num_heads=2)
  model = mae_lib.SimMIM(spec, rngs=nnx.Rngs(0))
  jaxpr = jax.make_jaxpr(lambda x: model(x)[0])(jnp.zeros((1, 32, 32, 1)))
  f = flops.simmim_forward_flops(image_size=32, patch_size=8, in_chans=1, width=32, depth=2)
  assert _dot_flops(jaxpr.jaxpr) == f


@pytest.mark.parametrize("norm_pix", [False, True])
def test_official_peer_gives_our_loss(tmp_path, norm_pix):
  """The timm-built peer is the official MAE: it loads our mae-full export strictly and, on the
  same images and masking noise, gives the project's loss and prediction."""
  import torch

  from benchmarks.official_mae_peer import sincos_table
  from tests import torch_refs

  spec, model, sd, peer = torch_refs.micro_mae_and_official_peer(decoder_depth=1, norm_pix=norm_pix,
                                                                 seed=1)
  peer = peer.eval()
  # Its own fixed tables equal ours before loading (an independent sin-cos implementation).
  np.testing.assert_allclose(peer.pos_embed.detach().numpy()[0], sd["pos_embed"].numpy()[0], atol=1e-6)
  np.testing.assert_allclose(sincos_table(16, 4), sd["decoder_pos_embed"].numpy()[0], atol=1e-6)
  peer.load_state_dict(sd, strict=True)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 1)).astype(np.float32)
  noise = rng.uniform(size=(3, spec.num_patches)).astype(np.float32)
  loss, pred, mask = model(jnp.asarray(images), noise=jnp.asarray(noise))
  with torch.no_grad():
    t_loss, t_pred, t_mask = peer(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                  noise=torch.from_numpy(noise))
  assert abs(float(loss) - t_loss.item()) <= 1e-5
  np.testing.assert_array_equal(np.asarray(mask), t_mask.numpy())
  np.testing.assert_allclose(np.asarray(pred), t_pred.numpy(), atol=1e-4)


def _run(args, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_step_cli_micro(tmp_path):
  path = tmp_path / "step.json"
  stdout = _run(["benchmarks.step", "--variant=micro", "--decoder=16x1x2", "--image_size=32",
                 "--patch=8", "--batch=4", "--steps=2", "--warmup=1",
                 "--recipes=mae,usfm", "--corruption", f"--json={path}"], tmp_path)
  assert "ratio (JAX mae img/s / torch-official img/s)" in stdout
  assert "ratio (JAX mae img/s / torch-hf img/s)" in stdout
  res = json.loads(path.read_text())["results"]
  assert set(res) == {"mae", "usfm", "torch-official", "torch-hf"}
  for name, r in res.items():
    assert r["images_per_s"] > 0 and r["steps"] == 2, name
  # The same model on every side (trainable parameters).
  assert res["mae"]["params"] == res["torch-official"]["params"] == res["torch-hf"]["params"]
  assert res["usfm"]["corruption_s"] > 0


def test_input_pipeline_cli_micro(tmp_path):
  path = tmp_path / "pipe.json"
  _run(["benchmarks.input_pipeline", "--config_args=smoke", "--image_size=32", "--batch=8",
        "--batches=2", "--warmup=1", f"--json={path}"], tmp_path)
  res = json.loads(path.read_text())
  assert res["images_per_s"] > 0 and res["images_per_s_per_core"] > 0


def test_levers_cli_micro(tmp_path):
  # One lever: the table's row for every lever is the same code (each lever's program is checked
  # in-process below).
  stdout = _run(["benchmarks.levers", "--levers=bf16", "--variant=micro",
                 "--decoder=16x1x2", "--image_size=32", "--patch=8", "--batch=4",
                 "--steps=1", "--warmup=1"], tmp_path)
  assert "\nbf16 " in stdout and "changed is" in stdout.split("\nbf16 ")[1].splitlines()[0]


@pytest.fixture(scope="module")
def committed_step():
  """The committed program of the levers' micro model and its loss, built once for every lever."""
  from benchmarks import levers
  args = levers.parse_args(["--variant=micro", "--decoder=16x1x2", "--image_size=32",
                            "--patch=8", "--batch=4"])
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  base = levers.build(args, images, None)
  return args, images, base.compiled.as_text(), base.loss()


@pytest.mark.parametrize("lever", ["full_decoder_tail", "remat", "scan", "bf16", "onednn_dots", "no_ynn"])
def test_each_lever_changes_the_program_and_exact_ones_keep_the_loss(lever, committed_step):
  """A lever that compiled to the committed program would measure nothing; every lever but bf16
  changes only how the step is computed, so one step from the same state gives the same loss."""
  from benchmarks import levers
  args, images, base_text, lb = committed_step
  other = levers.build(args, images, lever)
  assert base_text != other.compiled.as_text()
  lo = other.loss()
  if lever == "bf16":
    assert abs(lb - lo) < 0.05 * abs(lb)
  else:
    np.testing.assert_allclose(lo, lb, rtol=2e-5)


def test_scaling_cli_micro(tmp_path):
  path = tmp_path / "scaling.json"
  stdout = _run(["benchmarks.scaling", "--batches=4", "--variants=micro", "--base_variant=micro",
                 "--base_batch=4", "--recipes=mae,d2mae", "--image_size=32", "--patch=8",
                 "--decoder=16x1x2", "--steps=1", "--warmup=1", f"--json={path}"], tmp_path)
  res = json.loads(path.read_text())
  # the batch 4 row (the variant row is batch 4 again, not repeated) and the overhead row.
  assert set(res) == {"ViT-MICRO batch 4", "recipes"}
  assert "| ViT-MICRO batch 4 |" in stdout and "| d2mae (vs mae) |" in stdout
  assert res["ViT-MICRO batch 4"]["results"]["torch-official"]["images_per_s"] > 0


def test_scaling_rows_name_each_batch_and_variant_once():
  from benchmarks import scaling
  args = types.SimpleNamespace(batches=[2, 4], variants=["micro", "ti"], base_variant="micro", base_batch=4)
  assert scaling.rows(args) == [("ViT-MICRO batch 2", ["--variant=micro", "--batch=2"]),
                                ("ViT-MICRO batch 4", ["--variant=micro", "--batch=4"]),
                                ("ViT-TI batch 4", ["--variant=ti", "--batch=4"])]


def test_profile_categories_file_ops_by_scope_and_phase():
  """The per-op tables file each op by the model's named scope and by forward / backward."""
  from benchmarks import step
  hlo = (
      "HloModule m\n\nENTRY %main {\n"
      '  %dot.1 = f32[4,8]{1,0} dot(%a, %b), metadata={op_name="jit(train_step)/jvp(mlp)/dot_general"}\n'
      '  %dot.2 = f32[2,5,2,4]{3,2,1,0} dot(%c, %d), '
      'metadata={op_name="jit(train_step)/transpose(jvp(attn))/dot_general"}\n'
      '  %add_fusion.3 = f32[4,8]{1,0} fusion(%x), kind=kLoop, metadata={op_name="jit(train_step)/jvp(mlp)/add"}\n'
      "}\n")
  rows, cats = step.jax_op_rows({"dot.1": 2.0, "dot.2": 3.0, "add_fusion.3": 1.0}, hlo)
  assert {r["op"]: r["ms_per_step"] for r in rows} == {"dot": 5.0, "add_fusion": 1.0}
  assert cats["mlp matmul"]["forward"] == 2.0
  assert cats["attention matmul"]["backward"] == 3.0
  assert cats["mlp non-matmul"]["forward"] == 1.0


def test_memory_cli_micro(tmp_path):
  """benchmarks.memory AOT-compiles the real train step of a micro model and reports XLA's memory
  analysis: the arguments hold at least the parameters and AdamW's two moments (float32)."""
  path = tmp_path / "memory.json"
  stdout = _run(["benchmarks.memory", "--micro", "--recipes=mae", "--settings=on", f"--json={path}"], tmp_path)
  (row,) = json.loads(path.read_text())
  assert row["recipe"] == "mae" and row["setting"] == "on" and row["compile_s"] > 0
  assert row["argument_gb"] * 1e9 >= 3 * 4 * row["params_m"] * 1e6
  assert row["temp_gb"] > 0 and row["total_gb"] >= row["argument_gb"]
  assert "| mae | MICRO | 2 | on |" in stdout and "largest batch" in stdout


def test_tools_flags_coexist_and_start_from_defaults():
  """Every command-line tool keeps its absl flags in its own FlagValues: importing them all (and
  `mae_jax.main`, which defines --workdir and --config on absl's FLAGS) in one process raises no
  DuplicateFlagError; an in-process call starts from the defaults, not from the previous call's
  values; a misspelt flag or a stray positional argument is refused by name."""
  import importlib
  for name in ("mae_jax.main", "mae_jax.export", "mae_jax.import_weights", "mae_jax.data.phantom_compare",
               "benchmarks.step", "benchmarks.levers", "benchmarks.scaling", "benchmarks.blur",
               "benchmarks.input_pipeline", "benchmarks.memory"):
    importlib.import_module(name)
  from benchmarks import levers, step
  args = step.parse_args(["--notorch", "--batch=4", "--recipes=mae,usfm", "--nodonate"])
  assert (args.peers, args.batch, args.recipes, args.donate) == ([], 4, ["mae", "usfm"], False)
  args = step.parse_args([])  # the module docstring's defaults: issue 9's configuration
  assert (args.peers, args.batch, args.recipes, args.donate) == (["official", "transformers"], 32, ["mae"], True)
  assert (args.dec_width, args.dec_depth, args.dec_heads) == (256, 4, 8)
  assert levers.parse_args(["--levers=remat"]).peers == []
  with pytest.raises(SystemExit, match="image-size"):
    step.parse_args(["--image-size=32"])
  with pytest.raises(SystemExit, match="unexpected arguments 'mae'"):
    step.parse_args(["--recipes", "mae", "mae"])
  with pytest.raises(SystemExit, match="unknown lever 'nope'"):
    levers.parse_args(["--levers=nope"])
