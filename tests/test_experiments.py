"""Results tables: rows, shared and resumed runs, the summary's columns and numbers."""

import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ichpro.cli import main
from ichpro.config import get_profile
from ichpro.errors import IchproError
from ichpro.experiments import (
    COMPARISON_COLUMNS,
    TABLE_METRICS,
    TABLES,
    VARIANT,
    Row,
    compare_rows,
    comparisons,
    describe_table,
    fold_aucs,
    load_predictions,
    paired_auc,
    row_folder,
    row_manifest,
    row_profile,
    run_rows,
    summarize,
    summed_logits,
    table_rows,
    train_rows,
    write_table,
)
from ichpro.repeated_cv import holm

SMOKE = get_profile("smoke")


def cohort(n=60, seed=0):
    """A manifest and truth table of n patients whose oracle predicts the label well."""
    rng = np.random.default_rng(seed)
    oracle = rng.uniform(0.05, 0.95, n)
    label = (rng.uniform(size=n) < oracle).astype(int)
    ids = [f"P{i:03d}" for i in range(n)]
    reports = [f"Age: {60 + i % 20}\nHospital Stay: {i % 30} days\nGCS Score: {3 + i % 13}" for i in range(n)]
    manifest = pd.DataFrame({"patient_id": ids, "label": label, "report": reports})
    truth = pd.DataFrame({"patient_id": ids, "label": label, "p_bad_oracle": oracle,
                          "p_bad_oracle_report": oracle ** 2, "p_bad_oracle_image": 1 - oracle,
                          "p_bad_oracle_report_no_stay": oracle})
    return manifest, truth


def fake_train(calls):
    """A stand-in for cross_validate_seeds: out-of-fold predictions that depend on the row's config."""
    def train(profile, manifest, folders, *, resume, quiet, cache_dir):
        for folder in folders.values():
            calls.append((profile, folder, resume, manifest["report"].iloc[0]))
            rng = np.random.default_rng(abs(hash((profile.model.fusion, profile.model.modality,
                                                  profile.loss.terms))) % 2**32)
            folder.mkdir(parents=True, exist_ok=True)
            p_bad = np.clip(manifest["label"] * 0.4 + rng.uniform(0, 0.6, len(manifest)), 0, 1)
            pd.DataFrame({"patient_id": manifest["patient_id"], "fold": np.arange(len(manifest)) % 5,
                          "p_bad": p_bad, "label": manifest["label"]}).to_csv(folder / "oof_predictions.csv",
                                                                               index=False)
    return train


def test_rows_change_what_they_say():
    text_only = row_profile(SMOKE, table_rows("table1_modalities")[0])
    assert text_only.model.modality == "text" and text_only.loss.terms == (("ce", 1.0),)
    self_self = row_profile(SMOKE, table_rows("table2_fusion")[2])
    assert self_self.model.fusion == "self-self" and self_self.loss == SMOKE.loss
    assert [r.reference for r in table_rows("table3_losses")].count(True) == 1
    with pytest.raises(IchproError, match="table1_modalities"):
        table_rows("table9")
    # ICHPro is the same config in the three tables: one run folder
    references = {row_folder("out", SMOKE, next(r for r in rows if r.reference), 0)
                  for _, rows in TABLES.values()}
    assert len(references) == 1


def test_only_rows_that_read_the_pretrained_encoder_are_keyed_by_its_pretraining():
    other = replace(SMOKE, pretrain=replace(SMOKE.pretrain, epochs=SMOKE.pretrain.epochs + 1))
    by_name = {r.name: r for _, rows in TABLES.values() for r in rows}
    for name in ("Text only", "Small 3D CNN", "Logistic regression, clinical fields"):
        assert row_profile(SMOKE, by_name[name]).pretrain is None
        assert row_folder("out", SMOKE, by_name[name], 0) == row_folder("out", other, by_name[name], 0)
    for name in ("Vision only", "Cross-Self (ICHPro)", "Concatenation late fusion"):
        assert row_profile(SMOKE, by_name[name]).pretrain == SMOKE.pretrain
        assert row_folder("out", SMOKE, by_name[name], 0) != row_folder("out", other, by_name[name], 0)


def test_only_fusion_rows_are_keyed_by_the_vision_dropout():
    other = replace(SMOKE, model=replace(SMOKE.model, vision_dropout=0.3))
    by_name = {r.name: r for _, rows in TABLES.values() for r in rows}
    for name in ("Text only", "Vision only", "Small 3D CNN", "Concatenation late fusion"):
        assert row_profile(other, by_name[name]).model.vision_dropout == 0
        assert row_folder("out", SMOKE, by_name[name], 0) == row_folder("out", other, by_name[name], 0)
    for name in ("Cross-Self (ICHPro)", "Self-Self"):
        assert row_profile(other, by_name[name]).model.vision_dropout == 0.3
        assert row_folder("out", SMOKE, by_name[name], 0) != row_folder("out", other, by_name[name], 0)


def test_only_the_variant_adds_to_the_papers_loss_and_every_ichpro_row_is_the_papers_model():
    cpu = get_profile("cpu")
    assert cpu.loss.terms == (("ce", 1.0), ("imima", 1.0), ("sdm", 1.0), ("mlm", 1.0))  # VTMF
    for table, (_, rows) in TABLES.items():
        for row in rows:
            trained = row_profile(cpu, row)
            terms = dict(trained.loss.terms)
            if row.name == VARIANT:
                assert terms == {"ce": 1.0, "imima": 1.0, "sdm": 1.0, "mlm": 1.0, "numbers": 3.0}
                assert trained.model.vision_dropout == 0.0
                assert row.versus in ((), ("Text only", "Vision only"))
            else:
                assert "numbers" not in terms, (table, row.name)
            if "ICHPro" in row.name and "ours" not in row.name:
                assert trained.loss == cpu.loss and trained.model == cpu.model, (table, row.name)
    variant = {row_folder("out", cpu, r, 0) for _, rows in TABLES.values() for r in rows if r.name == VARIANT}
    assert len(variant) == 1  # Tables 1 and 4 share the variant's runs


def test_drop_stay_rows_see_reports_without_hospital_stay():
    manifest, _ = cohort()
    row = next(r for r in table_rows("table1_modalities") if r.drop_stay)
    edited = row_manifest(manifest, row)
    assert not edited["report"].str.contains("Hospital Stay").any()
    assert edited["report"].str.contains("GCS Score").all() and manifest["report"].str.contains("Stay").all()


def test_finished_rows_are_reused_and_unfinished_ones_resumed(tmp_path):
    manifest, _ = cohort()
    rows = table_rows("table1_modalities")
    calls = []
    run_rows(rows, SMOKE, manifest, tmp_path, train=fake_train(calls), quiet=True)
    assert len(calls) == len(rows)
    no_stay = next(i for i, row in enumerate(rows) if row.drop_stay)
    assert "Hospital Stay" not in calls[no_stay][3] and "Hospital Stay" in calls[0][3]
    run_rows(rows, SMOKE, manifest, tmp_path, train=fake_train(calls), quiet=True)
    assert len(calls) == len(rows)  # nothing retrained
    (row_folder(tmp_path, SMOKE, rows[1], 0) / "oof_predictions.csv").unlink()  # an interrupted row
    run_rows(rows, SMOKE, manifest, tmp_path, train=fake_train(calls), quiet=True)
    assert len(calls) == len(rows) + 1 and calls[-1][2] is True  # continued with resume


def test_summary_columns_paper_numbers_seeds_comparisons_and_ceiling(tmp_path):
    manifest, truth = cohort()
    rows = table_rows("table1_modalities")
    jobs = [(r, s) for r in rows for s in range(r.seeds)]
    train_rows(jobs, SMOKE, manifest, tmp_path, train=fake_train([]), quiet=True)
    predictions = load_predictions(rows, SMOKE, tmp_path)
    assert all(sorted(by_seed) == [0, 1, 2] for by_seed in predictions.values())
    table = summarize(rows, predictions, "1_modalities", truth, n_boot=200)
    metrics = [c for m in TABLE_METRICS for c in (f"paper_{m}", m, f"{m}_ci_low", f"{m}_ci_high")]
    seeds = ["auc_seed_min", "auc_seed_max", "auc_seed_sd"]
    assert list(table.columns) == (["row", "n_seeds", *metrics, *seeds, *COMPARISON_COLUMNS, "ceiling_auc",
                                    "auc_seed0", "auc_seed1", "auc_seed2"])
    text, vision, ichpro = (table.iloc[i] for i in range(3))
    assert text["paper_accuracy"] == pytest.approx(0.6915) and ichpro["paper_auc"] == pytest.approx(0.9429)
    assert np.isnan(table.iloc[3]["paper_auc"])  # not in the paper
    assert np.isnan(ichpro["p_holm"]) and 0 <= text["p"] <= text["p_holm"] <= 1
    ordered = truth.set_index("patient_id").loc[sorted(manifest["patient_id"])]
    for row, oracle in ((text, "p_bad_oracle_report"), (vision, "p_bad_oracle_image")):
        assert row["ceiling_auc"] == pytest.approx(roc_auc_score(ordered["label"], ordered[oracle]))
    aucs = [roc_auc_score(o["label"], o["p_bad"]) for o in predictions["Text only"].values()]
    assert text["auc"] == pytest.approx(np.mean(aucs)) and text["auc_seed_max"] == pytest.approx(max(aucs))
    assert (table["auc_ci_low"] <= table["auc"]).all() and (table["auc"] <= table["auc_ci_high"]).all()
    tests = comparisons(rows, predictions)
    assert len(tests) == len(rows) - 1 + 3  # each row vs ICHPro, vision vs text, the variant vs both
    assert ((tests["a"] == VARIANT) & (tests["b"] == "Vision only")).any()
    assert tests["p_holm"].tolist() == pytest.approx(holm(tests["p"]).tolist())
    paths = write_table(table, tests, tmp_path / "table1_modalities", "Table 1")
    assert [p.name for p in paths] == ["table1_modalities.csv", "table1_modalities_comparisons.csv",
                                       "table1_modalities.md", "table1_modalities.png"]
    assert all(p.stat().st_size for p in paths) and "0.943" in paths[2].read_text()


def test_the_table_figure_shows_the_seed_range_and_the_paper_apart():
    from ichpro.plots import plot_table_auc

    table = pd.DataFrame({"row": ["a", "b"], "auc": [0.8, 0.7], "auc_ci_low": [0.75, 0.65],
                          "auc_ci_high": [0.85, 0.75], "paper_auc": [0.9, np.nan], "ceiling_auc": 0.95,
                          "n_seeds": [3, 1], "auc_seed_min": [0.78, 0.7], "auc_seed_max": [0.82, 0.7]})
    fig = plot_table_auc(table, "t")
    (bars,) = [c for c in fig.axes[0].collections if c.get_label() == "range over training seeds"]
    assert [tuple(seg[:, 0]) for seg in bars.get_segments()] == [(0.78, 0.82)]  # row a only
    assert len(fig.axes) == 2 and fig.axes[0].get_xlim()[0] > 0.6  # the axis fits the numbers
    assert len(plot_table_auc(table.assign(paper_auc=np.nan), "t").axes) == 1


def test_rows_are_compared_patient_by_patient_whatever_their_order():
    manifest, _ = cohort(100)
    folds = np.arange(len(manifest)) % 5
    a = pd.DataFrame({"patient_id": manifest["patient_id"], "fold": folds, "label": manifest["label"],
                      "p_bad": np.random.default_rng(1).uniform(size=len(manifest))})
    b = a.assign(p_bad=a["label"] * 0.5 + 0.25)
    shuffled = {"a": {0: a}, "b": {0: b.sample(frac=1, random_state=0)}}
    said = compare_rows(shuffled, "b", "a")
    assert compare_rows({"a": {0: a}, "b": {0: b}}, "b", "a") == said
    auc_a = roc_auc_score(a["label"], a["p_bad"])
    assert said.startswith(f"b 1.000 vs a {auc_a:.3f} (AUC, one training seed): per-fold difference +")
    delong = paired_auc({"a": a, "b": b}, "b", "a")[2]
    assert said.endswith(f"not adjusted; median DeLong p = {delong:.2g}: the difference is real.")


def test_table_command_rejects_an_unknown_table(tmp_path, capsys):
    assert main(["table", "table7", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown table 'table7'" in capsys.readouterr().err


def test_a_tables_seeds_train_together_once_and_every_seed_is_summarised(tmp_path):
    manifest, _ = cohort()
    calls = []

    def train(profile, manifest, folders, *, resume, quiet, cache_dir):
        calls.append(list(folders))
        seeded_train(profile, manifest, folders, resume=resume, quiet=quiet, cache_dir=cache_dir)

    rows = [Row("A", seeds=3), Row("B", model={"fusion": "self"}, seeds=1, reference=True)]
    train_rows([(r, s) for r in rows for s in range(5, 5 + r.seeds)], SMOKE, manifest, tmp_path, train=train,
               quiet=True)
    assert calls == [[5, 6, 7], [5]]  # a row's seeds together
    predictions = load_predictions(rows, SMOKE, tmp_path, seed=5)
    table = summarize(rows, predictions, None, n_boot=100).set_index("row")
    aucs = [roc_auc_score(o["label"], o["p_bad"]) for o in predictions["A"].values()]
    assert table.at["A", "auc_seed_min"] == pytest.approx(min(aucs))
    assert table.at["A", "auc_seed_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert [table.at["A", f"auc_seed{s}"] for s in (5, 6, 7)] == pytest.approx(aucs)
    assert table.at["B", "n_seeds"] == 1 and np.isnan(table.at["B", "auc_seed6"])
    assert comparisons(rows, predictions).at[0, "n_seeds"] == 1  # compared on the seeds both rows have


def test_a_difference_is_real_only_by_the_adjusted_corrected_test():
    labels = np.tile([0, 1], 50)
    ids = [f"P{i:03d}" for i in range(100)]
    runs = {}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        folds = rng.permutation(np.arange(100) % 5)
        base = pd.DataFrame({"patient_id": ids, "fold": folds, "label": labels})
        runs.setdefault("good", {})[seed] = base.assign(p_bad=labels * 0.6 + rng.uniform(0, 0.4, 100))
        runs.setdefault("bad", {})[seed] = base.assign(p_bad=rng.uniform(size=100))
        runs.setdefault("twin", {})[seed] = runs["good"][seed].assign(p_bad=lambda o: o["p_bad"] * 0.9)
    assert compare_rows(runs, "good", "bad").endswith("the difference is real.")
    assert "the two are equivalent" in compare_rows(runs, "good", "twin")  # same ranking: difference 0
    rows = [Row("good", reference=True), Row("bad"), Row("twin")]
    tests = comparisons(rows, runs)
    said = describe_table(summarize(rows, runs, None, n_boot=50), tests, "good")
    assert said[1].startswith("1 of 2 comparisons real (Holm-adjusted corrected repeated-CV t-test, "
                              "p < 0.05): bad vs good -")
    assert said[2].startswith("1 of 2 comparisons equivalent (95 % interval of the difference within ±0.02): "
                              "twin vs good")


def seeded_train(profile, manifest, folders, *, resume, quiet, cache_dir):
    """A stand-in for cross_validate_seeds that worker processes can import: predictions drawn from
    each seed; it records the process it ran in."""
    for seed, folder in folders.items():
        rng = np.random.default_rng(seed)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pid").write_text(str(os.getpid()))
        pd.DataFrame({"patient_id": manifest["patient_id"], "fold": np.arange(len(manifest)) % 5,
                      "p_bad": manifest["label"] * 0.3 + rng.uniform(0, 0.7, len(manifest)),
                      "label": manifest["label"]}).to_csv(folder / "oof_predictions.csv", index=False)


def test_workers_train_each_row_in_a_process_of_its_own_with_the_serial_results(tmp_path):
    manifest, _ = cohort()
    profile = replace(SMOKE, pretrain=None)
    jobs = [(Row("A", seeds=2), 0), (Row("A", seeds=2), 1), (Row("B", model={"fusion": "self"}, seeds=1), 0)]
    train_rows(jobs, profile, manifest, tmp_path / "parallel", train=seeded_train, workers=2, quiet=True)
    train_rows(jobs, profile, manifest, tmp_path / "serial", train=seeded_train, quiet=True)
    pids = {}
    for kind in ("parallel", "serial"):
        folders = [row_folder(tmp_path / kind, profile, row, s) for row, s in jobs]
        assert all((f / "timing.json").is_file() for f in folders)
        pids[kind] = {(f / "pid").read_text() for f in folders}
    assert pids["serial"] == {str(os.getpid())} and str(os.getpid()) not in pids["parallel"]
    for row, s in jobs:
        pd.testing.assert_frame_equal(
            pd.read_csv(row_folder(tmp_path / "parallel", profile, row, s) / "oof_predictions.csv"),
            pd.read_csv(row_folder(tmp_path / "serial", profile, row, s) / "oof_predictions.csv"))
    (row_folder(tmp_path / "parallel", profile, *jobs[0]) / "pid").unlink()
    train_rows(jobs, profile, manifest, tmp_path / "parallel", train=seeded_train, workers=2, quiet=True)
    assert not (row_folder(tmp_path / "parallel", profile, *jobs[0]) / "pid").exists()  # finished: not rerun


def test_summed_logits_add_the_runs_log_odds_patient_by_patient():
    a = pd.DataFrame({"patient_id": ["x", "y"], "fold": [0, 1], "p_bad": [0.5, 0.8], "label": [0, 1]})
    b = pd.DataFrame({"patient_id": ["y", "x"], "fold": [1, 0], "p_bad": [0.5, 0.2], "label": [1, 0]})
    summed = summed_logits([a, b])
    assert list(summed["patient_id"]) == ["x", "y"] and list(summed["label"]) == [0, 1]
    # x: logit 0 + logit 0.2 -> 0.2; y: logit 0.8 + logit 0.5 -> 0.8
    assert summed["p_bad"].tolist() == pytest.approx([0.2, 0.8])
    assert summed_logits([a, a])["p_bad"].tolist() == pytest.approx([0.5, 16 / 17])


def test_fold_aucs_ignore_a_shift_between_folds_that_costs_the_pooled_auc():
    oof = pd.DataFrame({"patient_id": list("abcdefgh"), "fold": [0, 0, 0, 0, 1, 1, 1, 1],
                        "label": [0, 1, 0, 1, 0, 1, 0, 1],
                        "p_bad": [0.1, 0.2, 0.15, 0.3, 0.7, 0.8, 0.75, 0.9]})  # fold 1 shifted up
    assert fold_aucs(oof).tolist() == [1.0, 1.0]
    assert roc_auc_score(oof["label"], oof["p_bad"]) < 1.0
