"""Experiment sweeps (issue 4, item 7): every experiment loads, the D²MAE Table 3 sweep writes a
table with all twelve rows, shares repeated pretraining / transfer runs, and aggregates seeds with
the Student-t interval. The runs themselves are stubbed here (fine-tuning is tested elsewhere)."""

import json

import numpy as np
import pytest

from mae_jax import evaluate, sweeps


@pytest.mark.parametrize("name", sweeps.list_experiments())
def test_every_experiment_builds_its_configs(name):
  exp = sweeps.get_experiment(name)
  assert exp["rows"]
  for row in exp["rows"]:
    for config_name, args in filter(None, (row["pretrain"], row["transfer"])):
      for scale in sweeps.SCALES:
        sweeps.load_config(config_name, sweeps.scaled_args(args, scale))


def test_d2mae_table3_sweep_writes_every_row(tmp_path):
  exp = sweeps.get_experiment("d2mae_table3")
  pretrained, transferred = [], []

  def fake_pretrain(name, args, workdir, seed, overrides):
    pretrained.append((name, args, seed))

  def fake_transfer(name, args, workdir, pre, seed, overrides):
    transferred.append((pre, args, seed))
    f1 = 0.5 + 0.01 * seed + 0.001 * len(args)
    return {"test": {"macro_f1": {"value": f1}, "accuracy": {"value": 0.6}, "auroc": {"value": None}}}

  res = sweeps.run_sweep(exp, str(tmp_path), seeds=[0, 1, 2], scale="tiny", name="t3",
                         pretrain_fn=fake_pretrain, transfer_fn=fake_transfer)
  # 5 distinct pretrainings (default, 2 ranges, 2 embeddings) and 9 distinct fine-tunings per seed.
  assert len(pretrained) == 5 * 3 and len(set(pretrained)) == 15
  assert len(transferred) == 9 * 3
  assert all(args.startswith("smoke") for _, args, _ in pretrained)
  settings = [(r["ablation"], r["setting"]) for r in res["rows"]]
  assert len(settings) == 12 and ("(c) OBS", "fixed σ=0.5") in settings
  assert ("(a) range", "0.1→1.6") in settings and ("(d) search step", "s=3") in settings
  md = (tmp_path / "t3.md").read_text()
  assert md.count("\n| (") == 12
  row = next(r for r in res["rows"] if r["setting"] == "s=3")
  mean, lo, hi = evaluate.seed_ci(row["macro_f1"])
  assert f"{mean:.4f} ± {np.std(row['macro_f1'], ddof=1):.4f} [{lo:.4f}, {hi:.4f}]" in md
  blob = json.loads((tmp_path / "t3.json").read_text())
  assert blob["scale"] == "tiny" and blob["seeds"] == [0, 1, 2]
  assert next(r for r in blob["rows"] if r["setting"] == "with OBS")["p (vs ref)"] == "ref"
  assert np.isnan(np.asarray(row["auroc"], float)).all()


def test_overrides_and_errors():
  assert sweeps.parse_overrides(["train.epochs=10", "train.base_lr=0.1", "data.name=folder",
                                 "data.hflip=false"]) == {"train.epochs": 10, "train.base_lr": 0.1,
                                                          "data.name": "folder", "data.hflip": False}
  with pytest.raises(ValueError, match="key=value"):
    sweeps.parse_overrides(["epochs"])
  with pytest.raises(ValueError, match="--experiment='nope'"):
    sweeps.get_experiment("nope")
  with pytest.raises(ValueError, match="no such field"):
    sweeps.load_config("finetune", "smoke", {"train.nope": 1})
  assert sweeps.scaled_args("obs=none", "tiny") == "smoke,obs=none"
  assert sweeps.scaled_args("obs=none", "paper") == "obs=none"


def test_a_preempted_job_stops_the_sweep(tmp_path, monkeypatch):
  """A pretraining that returns preempted (checkpoint saved, SIGTERM) must not be followed by its
  transfer runs: they would start from an unfinished encoder. The CLI exits 0 so the scheduler's
  requeue reruns the same command, which resumes."""
  from mae_jax.train import finetune, pretrain
  calls = []
  monkeypatch.setattr(pretrain, "train", lambda config, wd: calls.append(("pre", wd)) or
                      {"preempted": True, "step": 7})
  monkeypatch.setattr(finetune, "run", lambda config, wd: calls.append(("ft", wd)) or {})
  exp = sweeps.get_experiment("d2mae_table3")
  with pytest.raises(sweeps.Preempted, match="pretraining .* preempted at step 7"):
    sweeps.run_sweep(exp, str(tmp_path), seeds=[0], scale="tiny", name="t3")
  assert [c[0] for c in calls] == ["pre"]
  assert sweeps.main(["--experiment=d2mae_table3", f"--root={tmp_path}", "--seeds=1"]) == 0
  assert [c[0] for c in calls] == ["pre", "pre"] and not (tmp_path / "d2mae_table3.json").exists()


def test_deblur_table2_plans_the_papers_sigmas_and_the_baseline(tmp_path):
  """Deblurring MAE Table 2: six blur methods, σ ∈ {0.8, 1.1, 1.4, 1.7, 2.0, 2.3} (the paper's
  column) and the vanilla ultrasound MAE baseline (pixel MSE), which the rows are t-tested against;
  the Gaussian method row and the σ = 1.1 row share one pretraining and one fine-tuning."""
  exp = sweeps.get_experiment("deblur_table2")
  runs = sweeps.plan(exp, str(tmp_path), seeds=[0], scale="tiny")
  assert len(runs) == 13
  sig = [r for r in runs if r["label"]["ablation"] == "Gaussian σ"]
  configs = [sweeps.load_config(name, args) for name, args, _ in (r["pretrain"] for r in sig)]
  assert [c.corrupt.sigma for c in configs] == [0.8, 1.1, 1.4, 1.7, 2.0, 2.3]
  assert all(c.recipe == "deblur" and c.corrupt.blur == "gaussian" for c in configs)
  base = [r for r in runs if r["label"]["ablation"] == "baseline"]
  assert len(base) == 1
  bc = sweeps.load_config(*base[0]["pretrain"][:2])
  assert bc.recipe == "mae" and bc.model.norm_pix_loss is False
  assert exp["reference"] == "baseline / MAE (US)"
  methods = {r["label"]["setting"]: r for r in runs if r["label"]["ablation"] == "blur method"}
  assert sorted(methods) == sorted(["gaussian", "srad", "mean", "median", "motion", "defocus"])
  assert methods["gaussian"]["pretrain"][2] == sig[1]["pretrain"][2]  # σ = 1.1: trained once
  assert len({r["pretrain"][2] for r in runs}) == 12
  assert len({r["transfer"][2] for r in runs}) == 12


def test_deblurring_tables_train_the_ultrasound_mae_baseline_in_pixel_space():
  for name in ("deblur_table1", "deblur_table2"):
    exp = sweeps.get_experiment(name)
    for row in exp["rows"]:
      for scale in sweeps.SCALES:
        c = sweeps.load_config(row["pretrain"][0], sweeps.scaled_args(row["pretrain"][1], scale))
        assert c.model.norm_pix_loss is False, (name, row["label"])


def test_usfm_ablation_covers_segmentation_and_baselines(tmp_path):
  """Classification and segmentation rows, each t-tested against its own USFM row; rows without
  pretraining run the transfer with scratch= and no init_from."""
  exp = sweeps.get_experiment("usfm_ablation")
  pretrained, transferred = [], []

  def fake_pretrain(name, args, workdir, seed, overrides):
    pretrained.append((args, seed))

  def fake_transfer(name, args, workdir, pre, seed, overrides):
    transferred.append((name, args, pre, seed))
    v = 0.5 + 0.01 * seed + 0.001 * len(args)
    if name == "segment":
      return {"test": {"dice": {"value": v}, "iou": {"value": v / 2}, "hd95": {"value": 3.0 + seed}}}
    return {"test": {"macro_f1": {"value": v}, "accuracy": {"value": 0.6}, "auroc": {"value": 0.7}}}

  res = sweeps.run_sweep(exp, str(tmp_path), seeds=[0, 1], scale="tiny", name="abl",
                         pretrain_fn=fake_pretrain, transfer_fn=fake_transfer)
  assert len(pretrained) == 4 * 2  # USFM, woF, woS, SimMIM-US: shared by both tasks
  assert sum(1 for n, a, pre, _ in transferred if pre is None and "scratch=usfm" in a) == 2 * 2
  assert all("paper=usfm" in a for _, a, _, _ in transferred)
  seg = [r for r in res["rows"] if r["task"] == "segmentation"]
  assert len(seg) == 5 and all("dice" in r and "macro_f1" not in r for r in seg)
  assert next(r for r in seg if r["method"] == "USFM")["p (vs ref)"] == "ref"
  md = (tmp_path / "abl.md").read_text()
  dice = next(r for r in seg if r["method"] == "SimMIM-US")["dice"]
  mean, lo, hi = evaluate.seed_ci(dice)
  assert f"{mean:.4f} ± {np.std(dice, ddof=1):.4f} [{lo:.4f}, {hi:.4f}]" in md
  assert "dice against `segmentation / USFM`" in md


def test_deblur_tables_use_its_protocol_and_show_the_positive_f1(tmp_path):
  exp = sweeps.get_experiment("deblur_table1")
  assert all("paper=deblur" in r["transfer"][1] for r in exp["rows"])

  def fake_transfer(name, args, workdir, pre, seed, overrides):
    return {"test": {m: {"value": 0.5 + 0.1 * seed} for m in sweeps.METRICS + ("f1_positive",)}}

  res = sweeps.run_sweep(exp, str(tmp_path), seeds=[0, 1], scale="tiny", name="d1",
                         pretrain_fn=lambda *a: None, transfer_fn=fake_transfer)
  assert all(r["f1_positive"] == [0.5, 0.6] for r in res["rows"])
  assert "f1_positive" in (tmp_path / "d1.md").read_text().split("\n")[2]


def test_dry_run_prints_each_rows_protocol(tmp_path, capsys):
  """At --scale=paper the MAE (US) baseline trains with the deblurring rows' batch and epochs
  (DeblurringMIM scripts/pretrain/mae.sh runs the same main_pretrain.py as de_mae.sh), and the dry
  run shows each row's pretraining batch / length and the transfer's selection metric."""
  assert sweeps.main(["--experiment=deblur_table1", f"--root={tmp_path}", "--scale=paper", "--seeds=1",
                      "--dry_run"]) == 0
  lines = {l.split(" seed ")[0]: l for l in capsys.readouterr().out.splitlines() if " seed " in l}
  deblur = sweeps.load_config("deblur_mae", "blur=gaussian")
  want = f"pretrain batch {deblur.train.batch_size}, {deblur.train.epochs:g} epochs"
  assert want == "pretrain batch 256, 12000 epochs"
  for label in ("MAE (US)", "Deblurring MAE (Gaussian)", "Deblurring MAE (SRAD)"):
    assert want in lines[label], lines[label]
    assert "selects on validation accuracy" in lines[label]
  assert sweeps.main(["--experiment=usfm_ablation", f"--root={tmp_path}", "--scale=paper", "--seeds=1",
                      "--dry_run"]) == 0
  out = capsys.readouterr().out.splitlines()
  cls = [l for l in out if l.startswith("classification")]
  seg = [l for l in out if l.startswith("segmentation")]
  assert cls and all("selects on validation balanced_accuracy every 5 epochs" in l for l in cls)
  assert seg and all("selects on validation dice every 5 epochs" in l for l in seg)


def test_cli_flags(tmp_path, capsys, monkeypatch):
  """absl flags as mae_jax.main: a rejected command line exits 2 with one line naming the flag, and
  each call parses from the defaults (a flag of one call does not carry into the next)."""
  assert sweeps.main(["--experiment=d2mae_table3", "--scale=huge", f"--root={tmp_path}"]) == 2
  assert "--scale=huge" in capsys.readouterr().err
  assert sweeps.main(["--experiment=d2mae_table3", "--no_such_flag=1"]) == 2
  assert sweeps.main(["--experiment=d2mae_table3"]) == 2
  assert "--experiment and --root are required" in capsys.readouterr().err
  assert sweeps.main(["--help"]) == 0 and "--transfer_override" in capsys.readouterr().out
  assert sweeps.main(["--experiment=d2mae_table3", f"--root={tmp_path}", "--seeds=1", "--dry_run",
                      "--transfer_override=train.epochs=2"]) == 0
  assert capsys.readouterr().out.count(" seed 0 ") == 12
  calls = []
  monkeypatch.setattr(sweeps, "run_sweep", lambda *a, **k: calls.append(k))
  assert sweeps.main(["--experiment=d2mae_table3", f"--root={tmp_path}"]) == 0
  assert calls[0]["seeds"] == [0, 1, 2] and calls[0]["transfer_overrides"] == {}
