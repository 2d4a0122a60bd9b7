"""docs/methods.md, the project's own method notes: every recipe and downstream job has its section,
every `docs/methods.md#anchor` cited in the code and docs resolves, and it cites papers and
official files, not a file outside the repository."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = REPO / "docs" / "methods.md"

# The stable anchors code comments point to (one per recipe and downstream job).
SECTIONS = ("mae", "mae-us", "deblurring-mae", "denoising-mae", "d2mae", "usfm",
            "organ-balanced-sampling", "focal-frequency-loss", "downstream", "fine-tuning",
            "linear-probe", "obs", "segmentation", "label-efficiency", "metrics", "export")


def _slug(heading: str) -> str:
  """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
  ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
  return ids | {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_recipe_and_job_has_a_section():
  text = METHODS.read_text()
  missing = [s for s in SECTIONS if s not in _anchors(text)]
  assert not missing, missing
  assert "SPEC" not in text


def test_cited_anchors_resolve():
  anchors = _anchors(METHODS.read_text())
  cited = {}
  for path in [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("configs/**/*.py"),
               *REPO.glob("mae_jax/**/*.py")]:
    for anchor in re.findall(r"docs/methods\.md#([\w\-²σ]+)", path.read_text()):
      cited.setdefault(anchor, []).append(path.relative_to(REPO).as_posix())
  assert "usfm" in cited and "deblurring-mae" in cited  # the configs do cite it
  unresolved = {a: files for a, files in cited.items() if a not in anchors}
  assert not unresolved, unresolved


def test_ffl_section_names_both_departures_from_usfm_eq13():
  text = METHODS.read_text()
  section = text.split('<a id="focal-frequency-loss"></a>', 1)[1].split("\n### ", 2)[1]
  for needle in ("Eq. 13", "norm='ortho'", "H·W", "min–max", "maximum"):
    assert needle in section, needle


def test_placeholders_for_the_blur_and_augmentation_notes():
  text = METHODS.read_text()
  for heading in ("### Blur strength (σ units)", "### USFM augmentation"):
    assert heading in text
  # under their recipes: the σ units under Deblurring MAE, the augmentation under USFM
  assert text.index("## Deblurring MAE") < text.index("### Blur strength") < text.index("## Denoising MAE")
  assert text.index("## USFM") < text.index("### USFM augmentation") < text.index("## Downstream")
