"""results.md of a downstream job on a folder dataset states the splits next to the metrics
(issue 27.7: a class with one image was trained on but absent from validation and test, unsaid)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from mae_jax.data import folder
from mae_jax.train import downstream


def test_results_md_names_the_classes_a_split_lacks(tmp_path):
  for cls, n in (("benign", 12), ("malignant", 12), ("rare", 1)):
    for i in range(n):
      (tmp_path / "src" / cls).mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((40, 40), 7 * i + len(cls), np.uint8)).save(tmp_path / "src" / cls / f"{i}.png")
  out = folder.build_folder_dataset(tmp_path / "src", tmp_path / "ds", task="classify")
  src = folder.folder_source(out, "train")
  files = json.loads((tmp_path / "ds" / "files.json").read_text())
  classes = json.loads((tmp_path / "ds" / "metadata.json").read_text())["classes"]
  # The one image of "rare" sits in exactly one split; the other two lack the class.
  rare = classes.index("rare")
  holding = [s for s in folder.SPLITS if any(r[2] == rare for r in files[s])]
  assert len(holding) == 1

  downstream.write_results(str(tmp_path / "job"), {"rows": [{"method": "x", "macro_f1": 0.5}]},
                           ["macro_f1"], src)
  md = (tmp_path / "job" / "results.md").read_text().splitlines()
  assert "| x | 0.5000 |" in md  # the metrics table is still there, first
  assert "## Data splits" in md
  rows = {ln.split("|")[1].strip(): ln for ln in md if ln.startswith("| ") and ln.count("|") == 5}
  for s in folder.SPLITS:
    n = len(files[s])
    assert rows[s].startswith(f"| {s} | {n} | "), rows[s]
    assert rows[s].endswith("| - |" if s in holding else "| rare |"), rows[s]
  # A source that is no folder dataset (us_phantom) gets the metrics only.
  downstream.write_results(str(tmp_path / "job2"), {"rows": [{"method": "x", "macro_f1": 0.5}]},
                           ["macro_f1"], object())
  assert "Data splits" not in (tmp_path / "job2" / "results.md").read_text()
