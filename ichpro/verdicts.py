"""A verdict for each claim of the paper, computed from the result CSVs a reproduction writes.

Each :class:`Claim` names what the paper says and how the companion tests it. Most claims say that one
row's AUC is above another's; they are judged by the comparisons of the tables
(:func:`ichpro.experiments.comparisons`: the corrected repeated-CV t-test, Holm-adjusted within each
table, and :func:`ichpro.repeated_cv.call_difference`):

* **reproduced**: every difference the claim names is real and in the paper's direction;
* **partly**: some are;
* **not reproduced**: none is (equivalent, not established, or real the other way);
* **not testable on synthetic data**: the claim is about numbers or data the synthetic cohort cannot
  carry (the reason says which).

The claims of Tables 1 and 4 are judged again on a second draw of the cohort
(:data:`ichpro.experiments.SECOND_COHORT_SEED`) where it has the rows, and a verdict that differs
between the two draws is marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ichpro.decision_curve import TABULATED, useful_models
from ichpro.experiments import VARIANT
from ichpro.paper import reported_tables
from ichpro.tripod import LAST_LAYER

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE = (
    "reproduced",
    "partly",
    "not reproduced",
    "not testable on synthetic data",
)
#: a raw or gradient-weighted attention map (``ichpro.explain``) and Grad-CAM
RAW_MAPS = ("stage1_cmaf_text_to_vision", "stage1_cmaf_vision_to_text", "stage2_mhsaf_self")
#: a map whose mass on the haematoma is within this share of a uniform map's does not single it out
FLAT = 0.05
#: an attention map has moved with the report when some brain cell's attention changes by this factor
MOVED = 1.10
SECOND_COHORT = "second_cohort"
#: the models the calibration claim is about: the paper's and its admission-time form
CALIBRATED = ("ICHPro", "ICHPro, no Hospital Stay")


@dataclass(frozen=True)
class Claim:
    """A claim and how it is tested: ``beats`` pairs (a, b) of rows of the results table ``table``
    whose AUC the paper puts a above b; ``kind`` is "comparison", "headline", "localisation",
    "counterfactual", "calibration", "decision", "sample_size" (notebook 12) or "untestable" (with its
    ``reason``)."""

    claim: str
    source: str
    table: str | None = None
    beats: tuple[tuple[str, str], ...] = ()
    kind: str = "comparison"
    reason: str = ""
    ours: bool = False  # a claim beyond the paper: about the companion's variant or the clinical scores
    paper_rows: tuple[str, str] = ()  # an untestable claim's (a, b) as the paper's table names them


NEIGHBOURS = {
    "Slice 2D CNN": "image-based 2D method [6]",
    "Image + GCS late fusion": "GCS-ICHNet",
    "Small 3D CNN": "DL-based 3D method [8]",
    "DenseNet + ord GCS + bin age": "multi-task 3D method [18]",
}
TABLE3_PAPER_ROWS = (
    "CE + blend",
    "CE + CMPM",
    "CE + CMFA",
    "CE + IMIMA",
    "CE + SDM",
    "CE + MLM",
    "CE + IMIMA + SDM",
    "CE + IMIMA + MLM",
)

CLAIMS = (
    Claim("ICHPro reaches AUC 0.943", "Tables 1-4", "table1_modalities", kind="headline"),
    Claim(
        "Fusing report and CT beats the report alone",
        "Table 1",
        "table1_modalities",
        (("ICHPro", "Text only"),),
    ),
    Claim(
        "Fusing report and CT beats the CT alone",
        "Table 1",
        "table1_modalities",
        (("ICHPro", "Vision only"),),
    ),
    Claim(
        "The CT alone beats the report alone", "Table 1", "table1_modalities", (("Vision only", "Text only"),)
    ),
    Claim(
        f"{VARIANT} beats each modality alone",
        "ours",
        "table1_modalities",
        ((VARIANT, "Text only"), (VARIANT, "Vision only")),
        ours=True,
    ),
    Claim(
        "Cross-Self (CMAF then MHSAF) beats every other arrangement",
        "Table 2",
        "table2_fusion",
        tuple(
            ("Cross-Self (ICHPro)", r) for r in ("Self", "Cross", "Self-Self", "Cross-Cross", "Self-Cross")
        ),
    ),
    Claim(
        "A cross-attention stage beats self-attention",
        "Table 2",
        "table2_fusion",
        (("Cross", "Self"), ("Cross-Cross", "Self-Self")),
    ),
    Claim(
        "VTMF beats every other loss of Table 3",
        "Table 3",
        "table3_losses",
        tuple(("VTMF (ICHPro)", r) for r in TABLE3_PAPER_ROWS),
    ),
    Claim(
        "IMIMA is the strongest single term",
        "Table 3",
        "table3_losses",
        (("CE + IMIMA", "CE + SDM"), ("CE + IMIMA", "CE + MLM")),
    ),
    Claim("SDM adds to IMIMA + MLM", "Table 3", "table3_losses", (("VTMF (ICHPro)", "CE + IMIMA + MLM"),)),
    Claim("MLM adds to IMIMA + SDM", "Table 3", "table3_losses", (("VTMF (ICHPro)", "CE + IMIMA + SDM"),)),
    *(
        Claim(f"ICHPro beats the {paper}", "Table 4", "table4_comparison", (("ICHPro", ours),))
        for ours, paper in NEIGHBOURS.items()
    ),
    Claim(
        "ICHPro beats UniMiSS [19]",
        "Table 4",
        "table4_comparison",
        kind="untestable",
        paper_rows=("ICHPro", "UniMiSS (2D+3D) [19]"),
        reason="UniMiSS is a self-supervised model pretrained on large unlabelled 2D and 3D collections; "
        "there is nothing comparable to pretrain it on here, so it has no row",
    ),
    *(
        Claim(f"ICHPro beats the {name}", "ours", "table4_comparison", (("ICHPro", row),), ours=True)
        for name, row in (
            ("clinical logistic regression", "Logistic regression, clinical fields"),
            ("ICH score", "ICH score"),
            ("FUNC score", "FUNC score"),
        )
    ),
    Claim("ICHPro's attention falls on the haemorrhage", "Fig. 3", kind="localisation"),
    Claim("ICHPro's attention moves with the report", "Fig. 3", kind="counterfactual"),
    Claim("After Platt scaling, ICHPro and its admission-time form (no Hospital Stay) show no "
          "miscalibration", "ours", kind="calibration", ours=True),
    Claim("Acting on ICHPro beats acting on everyone or no one "
          f"(thresholds {TABULATED[0]:.0%}-{TABULATED[-1]:.0%})",
          "ours", kind="decision", ours=True),
    Claim("480 patients are enough to develop ICHPro (Riley et al.)", "ours", kind="sample_size", ours=True),
)


def _read(figures: Path, name: str) -> pd.DataFrame | None:
    path = Path(figures) / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _pair(tests: pd.DataFrame, winner: str, loser: str) -> dict | None:
    """The comparison of ``winner`` against ``loser`` (a - b oriented winner - loser), or None."""
    for a, b, sign in ((winner, loser, 1), (loser, winner, -1)):
        line = tests[(tests["a"] == a) & (tests["b"] == b)]
        if len(line):
            t = line.iloc[0]
            low, high = sorted((sign * t["difference_ci_low"], sign * t["difference_ci_high"]))
            return {
                "auc_winner": t["auc_a"] if sign > 0 else t["auc_b"],
                "auc_loser": t["auc_b"] if sign > 0 else t["auc_a"],
                "difference": sign * t["difference"],
                "low": low,
                "high": high,
                "p_holm": t["p_holm"],
                "call": t["call"],
                "n_seeds": t["n_seeds"],
            }
    return None


def _judge_pairs(claim: Claim, tests: pd.DataFrame | None) -> tuple[str, str, str] | None:
    """(ours, verdict, reason) of a comparison claim from a comparisons table; None without the rows."""
    if tests is None:
        return None
    pairs = [_pair(tests, a, b) for a, b in claim.beats]
    if any(p is None for p in pairs):
        return None
    won = [p["call"] == "real" and p["difference"] > 0 for p in pairs]
    verdict = REPRODUCED if all(won) else NOT_REPRODUCED if not any(won) else PARTLY
    seeds = int(min(p["n_seeds"] for p in pairs))
    if len(pairs) == 1:
        p = pairs[0]
        ours = f"{p['auc_winner']:.3f} vs {p['auc_loser']:.3f}"
        reason = (
            f"Δ {p['difference']:+.3f} (95 % interval {p['low']:+.3f} to {p['high']:+.3f}), Holm p = "
            f"{p['p_holm']:.2g}: "
            + ("real" if won[0] else "real, the other way" if p["call"] == "real" else p["call"])
        )
    else:
        losers = [p["auc_loser"] for p in pairs]
        winners = sorted({round(p["auc_winner"], 3) for p in pairs})
        ours = f"{'/'.join(f'{w:.3f}' for w in winners)} vs {min(losers):.3f}-{max(losers):.3f}"
        calls = pd.Series(
            [
                ("real" if w else "real, the other way" if p["call"] == "real" else p["call"])
                for p, w in zip(pairs, won)
            ]
        ).value_counts()
        reason = (
            f"{sum(won)} of {len(pairs)} differences real; Δ {min(p['difference'] for p in pairs):+.3f} to "
            f"{max(p['difference'] for p in pairs):+.3f}; " + ", ".join(f"{n} {c}" for c, n in calls.items())
        )
    return f"{ours} ({seeds} seed{'s' if seeds > 1 else ''})", verdict, reason


def _paper_numbers(claim: Claim, summary: pd.DataFrame | None) -> str:
    """The paper's AUCs of a comparison claim's rows, as the table's CSV holds them."""
    if claim.ours:
        return "not in the paper"
    if summary is None:
        return ""
    paper = summary.set_index("row")["paper_auc"]
    winners = sorted({paper.get(a, np.nan) for a, _ in claim.beats})
    losers = [paper.get(b, np.nan) for _, b in claim.beats]
    if len(losers) == 1:
        return f"{winners[0]:.3f} vs {losers[0]:.3f}"
    return f"{'/'.join(f'{w:.3f}' for w in winners)} vs {min(losers):.3f}-{max(losers):.3f}"


def _paper_for_untestable(claim: Claim) -> str:
    """The paper's AUCs of an untestable claim's rows, from the paper's reported table."""
    reported = reported_tables()
    auc = reported[reported["table"] == claim.table.removeprefix("table")].set_index("row")["auc"]
    return " vs ".join(f"{auc[row]:.3f}" for row in claim.paper_rows)


def _headline(summary: pd.DataFrame | None) -> tuple[str, str, str, str]:
    if summary is None:
        return "0.943", "", "", ""
    row = summary.set_index("row").loc["ICHPro"]
    ours = (
        f"{row['auc']:.3f} ({row['auc_seed_min']:.3f}-{row['auc_seed_max']:.3f} over {int(row['n_seeds'])} "
        f"seeds); ceiling {row['ceiling_auc']:.3f}"
    )
    reason = (
        f"the synthetic cohort's all-variable ceiling ({row['ceiling_auc']:.3f}) is below the paper's "
        f"{row['paper_auc']:.3f}: no model can reach it here; ours closes "
        f"{(row['auc'] - 0.5) / (row['ceiling_auc'] - 0.5):.0%} of the way from chance to the ceiling"
    )
    return f"{row['paper_auc']:.3f}", ours, NOT_TESTABLE, reason


def _localisation(summary: pd.DataFrame | None) -> tuple[str, str, str, str]:
    if summary is None:
        return "shown, not measured", "", "", ""
    s = summary.set_index("method")
    above = s["pointing_ci_low"] > s["pointing_chance"]
    points = (s["ratio"] >= 1 + FLAT) & above
    raw = [m for m in RAW_MAPS if m in s.index]
    weighted = [m for m in s.index if m not in raw]
    best_raw = s.loc[raw, "ratio"].idxmax()
    best = s.loc[weighted, "ratio"].idxmax()
    ours = (
        f"raw maps {s.loc[raw, 'ratio'].min():.2f}-{s.loc[raw, 'ratio'].max():.2f}× uniform; "
        f"best other {best} {s.at[best, 'ratio']:.2f}×"
    )
    verdict = REPRODUCED if points[raw].any() else PARTLY if points[weighted].any() else NOT_REPRODUCED
    reason = (
        f"the raw attention maps put {s.at[best_raw, 'ratio']:.2f}× a uniform map's mass on the haematoma "
        f"at most ({best_raw}); "
        + ("one holds 5 % more than uniform and points at it above chance" if points[raw].any()
           else "none holds 5 % more than uniform and points at it above chance")
        + f"; {', '.join(m for m in weighted if points[m]) or 'no other map'} does"
    )
    return "shown, not measured", ours, verdict, reason


def _counterfactual(summary: pd.DataFrame | None) -> tuple[str, str, str, str]:
    if summary is None:
        return "shown, not measured", "", "", ""
    s = summary.iloc[0]
    factor = max(s["largest_change"], 1 / s["largest_change"])
    ours = (
        f"largest attention change ×{s['largest_change']:.3f}; P(bad) {s['p_bad_before']:.2f} → "
        f"{s['p_bad_after']:.2f}"
    )
    verdict = REPRODUCED if factor >= MOVED else NOT_REPRODUCED
    moved = "some attention map" if factor >= MOVED else "no attention map"
    reason = (
        f"the edit (worse GCS, older) changes {moved} by {MOVED:.2f}× or more within the brain "
        f"(largest ×{s['largest_change']:.3f}); P(bad) moves {s['p_bad_after'] - s['p_bad_before']:+.2f}"
    )
    return "shown, not measured", ours, verdict, reason


def _calibration(summary: pd.DataFrame) -> tuple[str, str, str]:
    """No miscalibration detected: the slope's interval holds 1 and calibration-in-the-large's holds 0
    (an absence of evidence, not equivalence), for each model of :data:`CALIBRATED`."""
    final = summary[summary["recalibration"] == "after Platt scaling"].set_index("model")
    ok, parts = [], []
    for model in CALIBRATED:
        s = final.loc[model]
        slope_ok = s["slope_ci_low"] <= 1 <= s["slope_ci_high"]
        citl_ok = s["citl_ci_low"] <= 0 <= s["citl_ci_high"]
        ok.append(slope_ok and citl_ok)
        parts.append(f"{model}: slope {s['slope']:.2f} ({s['slope_ci_low']:.2f}-{s['slope_ci_high']:.2f}) "
                     f"{'holds' if slope_ok else 'excludes'} 1, CITL {s['citl']:+.2f} "
                     f"({s['citl_ci_low']:+.2f} to {s['citl_ci_high']:+.2f}) "
                     f"{'holds' if citl_ok else 'excludes'} 0")
    ours = "; ".join(f"{m}: slope {final.at[m, 'slope']:.2f}" for m in CALIBRATED)
    verdict = REPRODUCED if all(ok) else PARTLY if any(ok) else NOT_REPRODUCED
    return ours, verdict, "; ".join(parts)


def _decision(curves: pd.DataFrame) -> tuple[str, str, str]:
    useful = [t for t in TABULATED if "ICHPro" in useful_models(curves, t)]
    verdict = REPRODUCED if len(useful) == len(TABULATED) else PARTLY if useful else NOT_REPRODUCED
    missed = [t for t in TABULATED if t not in useful]
    ours = f"above at {', '.join(f'{t:.0%}' for t in useful) or 'no threshold'}"
    where = ("every threshold tabulated" if not missed else
             f"{', '.join(f'{t:.0%}' for t in useful) or 'no threshold'}; not at "
             f"{', '.join(f'{t:.0%}' for t in missed)}")
    reason = ("its net benefit exceeds the better of treat all and treat none (paired 95 % interval above 0) "
              f"at {where}")
    return ours, verdict, reason


def _sample_size(table: pd.DataFrame) -> tuple[str, str, str]:
    here = table[table["c_from"] == table["c_from"].iloc[0]].set_index("counted")
    floor = here.loc[LAST_LAYER]
    ours = "; ".join(f"{counted}: {int(r['n_minimum']):,}" for counted, r in here.iterrows())
    verdict = REPRODUCED if floor["n_minimum"] <= floor["development"] else NOT_REPRODUCED
    reason = (f"counting only ICHPro's last layer ({int(floor['parameters'])} parameters, a floor), Riley's "
              f"criteria need {int(floor['n_minimum']):,} patients at C {floor['c']:.3f}; "
              f"a training fold has {int(floor['development'])} ({int(floor['patients'])} in all)")
    return ours, verdict, reason


#: the claims of notebook 12, by kind: the CSV each is judged from and its judge
CLINICAL = {"calibration": ("clinical_calibration", _calibration),
            "decision": ("clinical_decision_curves", _decision),
            "sample_size": ("clinical_sample_size", _sample_size)}


def verdict_table(figures: str | Path) -> pd.DataFrame:
    """One line per :data:`CLAIMS` entry: source, the paper's number, ours, the verdict and its reason,
    and the verdict on the second cohort draw where it has the rows (``differs`` marks a change).
    Claims whose CSVs are missing (a partial run) say so instead of a verdict."""
    figures = Path(figures)
    second = _read(figures, f"{SECOND_COHORT}_comparisons")
    lines = []
    for claim in CLAIMS:
        summary = _read(figures, claim.table) if claim.table else None
        if claim.kind == "headline":
            paper, ours, verdict, reason = _headline(summary)
        elif claim.kind == "localisation":
            paper, ours, verdict, reason = _localisation(_read(figures, "attention_localisation_summary"))
        elif claim.kind == "counterfactual":
            paper, ours, verdict, reason = _counterfactual(_read(figures, "attention_counterfactual_summary"))
        elif claim.kind in CLINICAL:
            csv, judge = CLINICAL[claim.kind]
            measured = _read(figures, csv)
            paper = "not reported"
            ours, verdict, reason = ("", "", "") if measured is None else judge(measured)
        elif claim.kind == "untestable":
            paper, ours, verdict, reason = _paper_for_untestable(claim), "—", NOT_TESTABLE, claim.reason
        else:
            judged = _judge_pairs(claim, _read(figures, f"{claim.table}_comparisons"))
            paper = _paper_numbers(claim, summary)
            ours, verdict, reason = judged or ("", "", "")
        if not verdict:
            ours, verdict, reason = "—", "not run", "its CSVs are missing: run the notebooks (make reproduce)"
        again = _judge_pairs(claim, second) if claim.kind == "comparison" else None
        lines.append(
            {
                "claim": claim.claim,
                "source": claim.source,
                "paper": paper,
                "ours": ours,
                "verdict": verdict,
                "reason": reason,
                "second_cohort": "" if again is None else f"{again[1]} ({again[0]})",
                "differs": again is not None and again[1] != verdict,
            }
        )
    return pd.DataFrame(lines)



def verdict_markdown(table: pd.DataFrame) -> str:
    """The verdict table as Markdown (the README's and notebook 00's)."""
    header = ["claim (source)", "paper AUC", "ours: mean over seeds", "verdict", "why", "second cohort draw"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in table.to_dict("records"):
        again = r["second_cohort"] + (" **differs**" if r["differs"] else "") if r["second_cohort"] else "—"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{r['claim']} ({r['source']})",
                    r["paper"] or "—",
                    r["ours"],
                    f"**{r['verdict']}**",
                    r["reason"],
                    again,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def describe_verdicts(table: pd.DataFrame) -> str:
    """How many claims got each verdict, of the paper's and of ours, and which differ on the second draw."""
    paper = table[table["source"] != "ours"]
    counts = paper["verdict"].value_counts()
    said = f"Of the paper's {len(paper)} claims: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "."
    differs = table.loc[table["differs"], "claim"].tolist()
    said += (" On the second cohort draw every verdict it could judge is the same." if not differs
             else f" On the second cohort draw {len(differs)} verdict(s) differ: {'; '.join(differs)}.")
    return said
