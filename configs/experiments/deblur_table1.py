"""Deblurring MAE Table 1: MAE (US) vs denoising MAE vs Deblurring MAE (Gaussian σ = 1.1 and SRAD),
each pretrained and fine-tuned with the same downstream recipe. The MAE row is the paper's
ultrasound-pretrained MAE, trained as openmedlab/DeblurringMIM `scripts/pretrain/mae.sh` does
(`configs/mae.py:us`): pixel MSE, batch 256 and 12,000 epochs, the same loss space, batch and
epochs as the deblurring rows (docs/methods.md#mae-us).

  python -m mae_jax.sweeps --experiment=deblur_table1 --root=runs/deblur_table1 --scale=tiny --seeds=3
"""

# The ultrasound MAE baseline: pixel-space loss, the deblurring rows' batch and epochs, as the reference.
MAE_US = ("mae", "us")


def get_experiment():
  rows = [
      ({"method": "MAE (US)"}, MAE_US),
      ({"method": "Denoising MAE"}, ("denoise_mae", "")),
      ({"method": "Deblurring MAE (Gaussian)"}, ("deblur_mae", "blur=gaussian")),
      ({"method": "Deblurring MAE (SRAD)"}, ("deblur_mae", "blur=srad")),
  ]
  return {"title": "Deblurring MAE Table 1", "reference": "MAE (US)",
          "rows": [{"label": l, "pretrain": p, "transfer": ("finetune", "paper=deblur")} for l, p in rows]}
