"""Deblurring MAE Table 2 (ablations): the blur method (Gaussian, SRAD, mean, median, motion,
defocus; kernel 5, defocus radius 5), the Gaussian σ column (0.8, 1.1, 1.4, 1.7, 2.0, 2.3) and the
'Baseline' row, the vanilla ultrasound MAE (`configs/mae.py:us`: pixel MSE, batch 256, 12,000
epochs, as openmedlab/DeblurringMIM `scripts/pretrain/mae.sh` trains it). The
other rows are t-tested against the baseline, as the paper compares them to it. Fine-tuning applies
each row's pretraining blur to every split (docs/methods.md#deblurring-mae).

The Gaussian row of the method column and the σ = 1.1 row are one pretraining and one fine-tuning
per seed (the paper reports the same F1, 88.48, for both).

  python -m mae_jax.sweeps --experiment=deblur_table2 --root=runs/deblur_table2 --scale=tiny --seeds=3
"""

METHODS = ("gaussian", "srad", "mean", "median", "motion", "defocus")
SIGMAS = ("0.8", "1.1", "1.4", "1.7", "2.0", "2.3")  # Table 2, right column
DEFAULT_SIGMA = "1.1"  # §3.2: the Gaussian variant's σ


def _blur_args(method: str, sigma: str = DEFAULT_SIGMA) -> str:
  # Gaussian rows always spell σ out, so the method row and the σ = 1.1 row have identical ARGS
  # and the sweep trains them once.
  return f"blur=gaussian,sigma={sigma}" if method == "gaussian" else f"blur={method}"


def get_experiment():
  rows = [({"ablation": "baseline", "setting": "MAE (US)"}, ("mae", "us"))]
  rows += [({"ablation": "blur method", "setting": m}, ("deblur_mae", _blur_args(m))) for m in METHODS]
  rows += [({"ablation": "Gaussian σ", "setting": s}, ("deblur_mae", _blur_args("gaussian", s)))
           for s in SIGMAS]
  return {"title": "Deblurring MAE Table 2 (blur methods, σ)", "reference": "baseline / MAE (US)",
          "rows": [{"label": l, "pretrain": p, "transfer": ("finetune", "paper=deblur")} for l, p in rows]}
