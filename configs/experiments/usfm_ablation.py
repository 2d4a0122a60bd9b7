"""USFM ablation: the full dual masking vs without frequency masking (USFM-woF) vs without
organ-balanced sampling (USFM-woS).

  python -m mae_jax.sweeps --experiment=usfm_ablation --root=runs/usfm_ablation --scale=tiny --seeds=3
"""


def get_experiment():
  rows = [
      ({"method": "USFM"}, ("usfm", "")),
      ({"method": "USFM-woF (no frequency mask)"}, ("usfm", "nofreq")),
      ({"method": "USFM-woS (uniform sampling)"}, ("usfm", "nobalance")),
  ]
  return {"title": "USFM ablation", "reference": "USFM",
          "rows": [{"label": l, "pretrain": p, "transfer": ("finetune", "")} for l, p in rows]}
