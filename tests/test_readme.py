"""The README's result tables are the committed CSVs, and its map names every committed figure."""

import re
import subprocess

import pandas as pd
import pytest

from ichpro.config import REPO_ROOT
from ichpro.errors import IchproError
from ichpro.experiments import readme_table
from ichpro.reproduce import README_TABLES, README_VERDICTS, fill_readme

README = (REPO_ROOT / "README.md").read_text()
FIGURES = REPO_ROOT / "figures"


def test_every_results_table_is_quoted():
    quoted = {m.group(2) for m in README_TABLES.finditer(README)}
    assert quoted == {"table1_modalities", "table2_fusion", "table3_losses", "table4_comparison"}


def test_the_readme_tables_and_verdicts_are_the_committed_csvs(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text(README)
    fill_readme(copy, FIGURES)
    assert copy.read_text() == README, "regenerate with make reproduce (ichpro.reproduce.fill_readme)"


def test_filling_a_readme_rewrites_only_its_generated_blocks(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# A\n<!-- verdicts: here -->\nSTALE\n<!-- /verdicts -->\n\n"
                      "[t1](figures/table1_modalities.md) below.\n\n| STALE |\n| --- |\n\nafter\n")
    fill_readme(readme, FIGURES)
    text = readme.read_text()
    assert text.startswith("# A\n<!-- verdicts: here -->\n| claim (source) |") and "STALE" not in text
    assert text.endswith(readme_table(pd.read_csv(FIGURES / "table1_modalities.csv")) + "\nafter\n")
    readme.write_text("# no blocks\n")
    with pytest.raises(IchproError, match="no verdict block"):
        fill_readme(readme, FIGURES)


def test_readme_table_formats_a_row_by_hand():
    row = {"row": "A", "paper_auc": float("nan"), "auc": 0.81234, "auc_ci_low": 0.7, "auc_ci_high": 0.9,
           "ceiling_auc": 0.912, "n_seeds": 3, "auc_seed_min": 0.8, "auc_seed_max": 0.83,
           "auc_seed_sd": 0.0151,
           "difference": -0.0512, "difference_ci_low": -0.08, "difference_ci_high": -0.02, "p_holm": 4.8e-05,
           "call": "real"}
    assert readme_table(pd.DataFrame([row])).splitlines()[2] == (
        "| A | — | 0.812 (0.700-0.900) | 0.800-0.830 (sd 0.015, 3 seeds) | -0.051 (-0.080 to -0.020) "
        "| 4.8e-05 | real | 0.912 |")
    reference = {**row, "n_seeds": 1, "difference": float("nan")}
    line = readme_table(pd.DataFrame([reference])).splitlines()[2]
    assert line.endswith("| 1 seed | reference |  |  | 0.912 |")


def test_the_readme_shows_the_verdict_table_of_the_committed_results_on_its_first_screen():
    match = README_VERDICTS.search(README)
    assert match, "the README needs its verdict block"
    assert README[:match.end()].count("\n") < 60 + len(match.group(1).splitlines())
    assert README[:match.start()].count("\n") < 60
    assert "not run" not in match.group(2)


def test_the_readme_is_a_landing_page():
    assert README.count("\n") <= 250


def _committed(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    return [line.removeprefix("figures/") for line in out.split()]


def test_the_map_names_every_committed_figure_and_table():
    committed = [f for f in _committed("figures") if f.endswith((".png", ".csv", ".md"))]
    map_section = README.split("## Paper items, notebooks and outputs")[1].split("\n## ")[0]
    names = set(re.findall(r"[\w./-]+\.(?:png|csv|md)", map_section))
    expanded = set()
    for stem, exts in re.findall(r"([\w/-]+)\.\{([\w,]+)\}", map_section):
        expanded |= {f"{stem}.{e}" for e in exts.split(",")}
    missing = [f for f in committed if f not in names | expanded and not f.startswith("notebooks/")]
    assert committed and not missing, f"add to the README's map: {missing}"


def test_every_executed_notebook_is_linked():
    executed = [f for f in _committed("figures/notebooks") if f.endswith(".ipynb")]
    missing = [f for f in executed if f"figures/{f}" not in README]
    assert not missing, f"link from the README: {missing}"


#: a Markdown link or image target: ``[text](target)`` / ``![alt](target)``, without a title
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _documents() -> list:
    docs = sorted((REPO_ROOT / "docs").glob("*.md"))
    return [REPO_ROOT / "README.md", REPO_ROOT / "bench" / "README.md", *docs]


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(document):
    targets = [t.split("#")[0] for t in LINK.findall(document.read_text())
               if not re.match(r"[a-z]+:|#", t)]
    broken = [t for t in targets if t and not (document.parent / t).exists()]
    assert targets and not broken, f"{document.name}: broken links {broken}"
