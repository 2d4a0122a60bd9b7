"""D²MAE Table 3: ablations of the blurriness range, the blurriness embedding, the OBS setting and
the search step (F1 on GE4K in the paper: 89.68 / 89.84 / 89.43; 87.66 / 88.57 / 89.84;
87.95 / 88.36 / 89.84; 89.94 / 89.84 / 89.05). The default D²MAE (range 0.1→1.1, token, OBS with
s = 2) appears in all four groups; it is pretrained and fine-tuned once per seed.

  python -m mae_jax.sweeps --experiment=d2mae_table3 --root=runs/d2mae_table3 --scale=tiny --seeds=3
"""

DEFAULT = ("d2mae", "")
FT = "finetune"


def get_experiment():
  rows = [
      ({"ablation": "(a) range", "setting": "0.1→0.6"}, ("d2mae", "range=0.1:0.6:0.1"), (FT, "")),
      ({"ablation": "(a) range", "setting": "0.1→1.1"}, DEFAULT, (FT, "")),
      ({"ablation": "(a) range", "setting": "0.1→1.6"}, ("d2mae", "range=0.1:1.6:0.1"), (FT, "")),
      ({"ablation": "(b) embedding", "setting": "w/o embedding"}, ("d2mae", "embed=none"), (FT, "")),
      ({"ablation": "(b) embedding", "setting": "addition"}, ("d2mae", "embed=add"), (FT, "")),
      ({"ablation": "(b) embedding", "setting": "extra token"}, DEFAULT, (FT, "")),
      ({"ablation": "(c) OBS", "setting": "no blur"}, DEFAULT, (FT, "obs=none")),
      ({"ablation": "(c) OBS", "setting": "fixed σ=0.5"}, DEFAULT, (FT, "obs=fixed,fixed_sigma=0.5")),
      ({"ablation": "(c) OBS", "setting": "with OBS"}, DEFAULT, (FT, "")),
      ({"ablation": "(d) search step", "setting": "s=1"}, DEFAULT, (FT, "obs=search,step=1")),
      ({"ablation": "(d) search step", "setting": "s=2"}, DEFAULT, (FT, "")),
      ({"ablation": "(d) search step", "setting": "s=3"}, DEFAULT, (FT, "obs=search,step=3")),
  ]
  return {"title": "D²MAE Table 3 (ablations)", "reference": "(c) OBS / with OBS",
          "rows": [{"label": l, "pretrain": p, "transfer": t} for l, p, t in rows]}
