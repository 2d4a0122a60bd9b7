"""Deblurring MAE Table 2: the blur method (Gaussian, SRAD, mean, median, motion, defocus; kernel 5,
defocus radius 5) and the Gaussian σ sweep (0.3 … 1.9). Fine-tuning applies each row's pretraining
blur to every split.

  python -m mae_jax.sweeps --experiment=deblur_table2 --root=runs/deblur_table2 --scale=tiny --seeds=3
"""

METHODS = ("gaussian", "srad", "mean", "median", "motion", "defocus")
SIGMAS = ("0.3", "0.7", "1.1", "1.5", "1.9")


def get_experiment():
  rows = [({"ablation": "blur method", "setting": m}, ("deblur_mae", f"blur={m}")) for m in METHODS]
  rows += [({"ablation": "Gaussian σ", "setting": s}, ("deblur_mae", f"blur=gaussian,sigma={s}"))
           for s in SIGMAS]
  return {"title": "Deblurring MAE Table 2 (blur methods, σ)", "reference": "blur method / gaussian",
          "rows": [{"label": l, "pretrain": p, "transfer": ("finetune", "paper=deblur")} for l, p in rows]}
