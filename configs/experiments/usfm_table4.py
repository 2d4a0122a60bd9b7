"""USFM Table 4 (image enhancement): per organ, CycleGAN, CycleGAN + the features of a SimMIM-style
pretraining, CycleGAN + the features of USFM (§4.1.2, Fig. 5b), on the paired low / high-quality
phantom acquisitions (`us_phantom` task='enhance'), test SSIM / LNCC / NMI; plus, per organ, the
figure low | CycleGAN | + SimMIM-style | + USFM | high of the first seed (`table4_<organ>.png`).

USFM's SimMIM row is SimMIM pretrained on natural images; no natural-image data set is bundled here,
so the SimMIM-style row is the SimMIM path (all tokens, linear decoder, L1 + FFL) with spatial masking
only (`configs/usfm.py:nofreq`, i.e. USFM-woF) pretrained on the same phantom images — swap its
pretraining for a natural-image SimMIM checkpoint's workdir to reproduce the published contrast. The
plain CycleGAN row ignores its (shared USFM) pretraining (`nofeatures`). The phantom has no carotid
organ (its thyroid scenes hold the carotids): its four organs with a linear or convex probe stand in
for USEnhance2023's thyroid, carotid, liver and kidney.

  python -m mae_jax.sweeps --experiment=usfm_table4 --root=runs/table4 --scale=tiny --seeds=3
"""

ORGANS = ("thyroid", "breast", "liver", "kidney")
METHODS = (("CycleGAN", ("usfm", ""), "nofeatures"),
           ("+ SimMIM-style features", ("usfm", "nofreq"), ""),
           ("+ USFM features", ("usfm", ""), ""))


def figures(results, root):
  """low | each method's output | high on the first seed's test pairs, one figure per organ."""
  import os

  from mae_jax import visualize
  for organ in ORGANS:
    runs = [results["runs"].get(f"{organ} / {method}") for method, _, _ in METHODS]
    if not all(runs):  # a subset of the rows was run
      continue
    workdirs = [r[0] for r in runs]
    if all(os.path.exists(os.path.join(w, "predictions_test.npz")) for w in workdirs):
      visualize.write_enhancement_figure(workdirs, os.path.join(root, f"table4_{organ}.png"),
                                         labels=[method for method, _, _ in METHODS])


def get_experiment():
  rows = [{"label": {"organ": organ, "method": method}, "pretrain": pretrain,
           "transfer": ("enhance", ",".join(filter(None, (f"organ={organ}", extra))))}
          for organ in ORGANS for method, pretrain, extra in METHODS]
  return {"title": "USFM Table 4: image enhancement (test SSIM, LNCC, NMI per organ)",
          "reference": None, "metrics": ("ssim", "lncc", "nmi_sym", "nmi"), "rows": rows,
          "after": figures}
