"""USFM ablation (USFM Fig. 11): the full dual masking vs without frequency masking (USFM-woF), without
organ-balanced sampling (USFM-woS) and SimMIM's masking on ultrasound (SimMIM-US), each on USFM's
backbone with USFM's downstream protocol (`paper=usfm`), for classification (macro-F1) and
segmentation (UperNet, mean Dice); plus the baselines without pretraining (ViT from scratch, UperNet
without pretraining) on the same backbone.

  python -m mae_jax.sweeps --experiment=usfm_ablation --root=runs/usfm_ablation --scale=tiny --seeds=2
"""

PRETRAININGS = [
    ("USFM", ("usfm", "")),
    ("USFM-woF (no frequency mask)", ("usfm", "nofreq")),
    ("USFM-woS (uniform sampling)", ("usfm", "nobalance")),
    ("SimMIM-US", ("usfm", "simmim")),
    ("no pretraining", None),
]
TASKS = [("classification", "finetune"), ("segmentation", "segment")]


def get_experiment():
  rows = []
  for task, transfer in TASKS:
    for method, pre in PRETRAININGS:
      args = "paper=usfm" + (",scratch=usfm" if pre is None else "")
      rows.append({"label": {"task": task, "method": method}, "pretrain": pre,
                   "transfer": (transfer, args)})
  return {"title": "USFM ablation", "reference": "classification / USFM",
          "references": {"segment": "segmentation / USFM"}, "rows": rows}
