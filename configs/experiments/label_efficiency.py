"""Label-efficiency curves (USFM §5.3, Fig. 10): each recipe fine-tuned on 20/40/60/80/100 % of the
training labels (stratified; the same subset for every method at a given seed; nested across
fractions). One pretraining per recipe and seed serves all fractions. The MAE row is He et al.'s
recipe (norm-pix loss); `("mae", "us")` would be the Deblurring MAE tables' pixel-space
"MAE (US)" (docs/methods.md#label-efficiency).

  python -m mae_jax.sweeps --experiment=label_efficiency --root=runs/label_eff --scale=tiny --seeds=3
"""

METHODS = (("MAE", "mae", ""), ("Deblurring MAE", "deblur_mae", "blur=gaussian"),
           ("D²MAE", "d2mae", ""), ("USFM", "usfm", ""))
FRACTIONS = ("0.2", "0.4", "0.6", "0.8", "1.0")


def get_experiment():
  rows = [{"label": {"method": name, "labels": f"{float(f):.0%}"}, "pretrain": (cfg, args),
           "transfer": ("finetune", f"fraction={f}")}
          for name, cfg, args in METHODS for f in FRACTIONS]
  return {"title": "Label efficiency (test macro-F1 vs fraction of training labels)",
          "reference": "MAE / 100%", "rows": rows}
