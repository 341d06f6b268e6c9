"""Named profiles (smoke, cpu, paper) and the preprocessing configuration they share."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ichpro.errors import IchproError

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = REPO_ROOT / "data_synthetic"

#: The paper's CT window (official code): HU in [15, 400] mapped to [0, 1].
PAPER_WINDOW = (15.0, 400.0)
#: The common brain window, level 40 / width 80: HU in [0, 80].
BRAIN_WINDOW = (0.0, 80.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a raw CT becomes the model's input tensor of shape (1, D, H, W)."""

    spatial_size: tuple[int, int, int] = (16, 64, 64)  # D (slices), H, W
    hu_window: tuple[float, float] = PAPER_WINDOW
    skull_strip: bool = True
    crop_to_brain: bool = True  # crop to the brain's bounding box before resizing
    mean: float | None = None  # optional z-normalisation after windowing
    std: float | None = None


@dataclass(frozen=True)
class Profile:
    """A named set of sizes: the same code runs every profile."""

    name: str
    cohort: str  # name of a spec in data_synthetic/ (or a path)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", cohort="smoke", preprocess=PreprocessConfig(spatial_size=(16, 64, 64))),
    "cpu": Profile("cpu", cohort="cpu", preprocess=PreprocessConfig(spatial_size=(32, 64, 64))),
    "paper": Profile(
        "paper",
        cohort="cpu",
        preprocess=PreprocessConfig(spatial_size=(32, 512, 512), crop_to_brain=False),
    ),
}


def get_profile(name: str, **overrides) -> Profile:
    """Return the named profile, optionally with some fields replaced."""
    if name not in PROFILES:
        raise IchproError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return replace(PROFILES[name], **overrides)
