"""Deblurring MAE Table 1: MAE vs denoising MAE vs Deblurring MAE (Gaussian σ = 1.1 and SRAD),
each pretrained and fine-tuned with the same downstream recipe.

  python -m mae_jax.sweeps --experiment=deblur_table1 --root=runs/deblur_table1 --scale=tiny --seeds=3
"""


def get_experiment():
  rows = [
      ({"method": "MAE"}, ("mae", "")),
      ({"method": "Denoising MAE"}, ("denoise_mae", "")),
      ({"method": "Deblurring MAE (Gaussian)"}, ("deblur_mae", "blur=gaussian")),
      ({"method": "Deblurring MAE (SRAD)"}, ("deblur_mae", "blur=srad")),
  ]
  return {"title": "Deblurring MAE Table 1", "reference": "MAE",
          "rows": [{"label": l, "pretrain": p, "transfer": ("finetune", "paper=deblur")} for l, p in rows]}
