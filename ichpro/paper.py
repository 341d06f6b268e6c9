"""The numbers ICHPro reports (Yu et al., ISBI 2024), shipped as package data."""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

TABLES = {
    "1_modalities": "Table 1: modalities",
    "2_fusion": "Table 2: fusion structures",
    "3_losses": "Table 3: loss functions",
    "4_comparison": "Table 4: comparison with other methods",
}


def reported_tables() -> pd.DataFrame:
    """Every row of the paper's four result tables (percentages as printed, F1/AUC as 0-1)."""
    return pd.read_csv(files("ichpro").joinpath("paper_tables.csv"))
