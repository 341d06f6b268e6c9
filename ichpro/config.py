"""Named profiles (smoke, cpu, paper) and the preprocessing configuration they share."""

from __future__ import annotations

import os
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


FUSION_STRUCTURES = ("self", "cross", "self-self", "cross-cross", "self-cross", "cross-self")
MODALITIES = ("both", "vision", "text")  # Table 1: the fused model and each encoder alone


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the ICHPro model; see ``ichpro.models`` for what each part does."""

    vision_depth: int = 50  # MONAI 3D ResNet depth: 10, 18, 34 or 50
    vision_widths: tuple[int, int, int, int] = (64, 128, 256, 512)  # block_inplanes
    vision_no_max_pool: bool = False  # drop the stem's max-pool (small inputs keep an 8x8 map)
    vision_weights: str | None = None  # local state dict (e.g. MedicalNet) for the vision encoder
    text_encoder: str = "bioclinicalbert"  # tiny | minilm | bioclinicalbert | a local folder
    text_layers: int | None = None  # token states after this many encoder layers (None: all)
    max_tokens: int = 128
    trt: str = "queries"  # TRT: grid-cell queries over the tokens | positional (a token-position map)
    dim: int = 256  # fusion width C
    grid: tuple[int, int, int] = (2, 8, 8)  # fusion grid G (d, h, w)
    cmaf_pool: tuple[int, int, int] | None = None  # CMAF's SoftPool kernel (None: 2 on even sides)
    heads: int = 16  # MHSAF heads
    fusion: str = "cross-self"  # one of FUSION_STRUCTURES
    modality: str = "both"  # one of MODALITIES; a single modality replaces the fusion by self-attention
    header_blocks: tuple[int, ...] = (6, 12, 24, 16)  # DenseNet-121
    header_growth: int = 32
    freeze_vision: bool = False
    freeze_text: bool = False
    comparator: str | None = None  # train this comparator (ichpro.models.comparators) instead of ICHPro
    comparator_input: tuple[int, int, int] | None = None  # CT size comparators train on (None: the profile's)


MLM_VOCABULARIES = ("full", "reports")
CALIBRATIONS = ("none", "platt")  # TrainConfig.calibration (ichpro.calibration)


@dataclass(frozen=True)
class LossConfig:
    """Named loss terms and their weights, plus the terms' hyper-parameters."""

    terms: tuple[tuple[str, float], ...] = (("ce", 1.0), ("imima", 1.0), ("sdm", 1.0), ("mlm", 1.0))
    temperature: float = 0.07  # tau of IMIMA and SDM
    mlm_probability: float = 0.15
    mlm_variants: int = 4  # masked copies of each report encoded once when the text encoder is frozen
    mlm_vocabulary: str = "full"  # MLM softmax over: full (the encoder's vocabulary) | reports (their words)

    def __post_init__(self):
        if self.mlm_vocabulary not in MLM_VOCABULARIES:
            raise IchproError(f"unknown mlm_vocabulary {self.mlm_vocabulary!r}; choose one of "
                              f"{', '.join(MLM_VOCABULARIES)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and cross-validation settings (the paper: Adam, lr 1e-4, batch 4, 300 epochs)."""

    epochs: int = 300
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    n_folds: int = 5
    val_fraction: float = 0.2  # inner validation split of the training folds (checkpoint selection)
    patience: int | None = None  # early stopping after this many epochs without improvement
    lr_schedule: str = "constant"  # constant | cosine (from lr down to 0 at the last epoch)
    grad_accumulation: int = 1
    calibration: str = "none"  # none | platt (each fold's P(bad) recalibrated on its inner validation split)
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | off
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise IchproError(f"unknown calibration {self.calibration!r}; choose one of "
                              f"{', '.join(CALIBRATIONS)}")


@dataclass(frozen=True)
class PretrainConfig:
    """Vision-encoder pretraining (segmentation + volume) on the profile's cohort spec with its own seed."""

    seed: int = 1  # the pretraining cohort's seed: other patients than the evaluation cohort's
    n_patients: int = 96
    epochs: int = 6
    batch_size: int = 8
    lr: float = 3e-3
    held_out: float = 0.2  # share of the pretraining cohort kept for Dice and volume MAE
    volume_weight: float = 0.5


@dataclass(frozen=True)
class Profile:
    """A named set of sizes: the same code runs every profile."""

    name: str
    cohort: str  # name of a spec in data_synthetic/ (or a path)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig | None = None  # pretrain the vision encoder when no weights file is given


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke",
        cohort="smoke",
        preprocess=PreprocessConfig(spatial_size=(16, 64, 64)),
        model=ModelConfig(vision_depth=10, vision_widths=(8, 16, 32, 64), vision_no_max_pool=True,
                          text_encoder="tiny", dim=32, grid=(2, 4, 4), heads=4,
                          header_blocks=(2, 2, 2, 2), header_growth=8, freeze_vision=True,
                          freeze_text=True, comparator_input=(16, 32, 32)),
        loss=LossConfig(mlm_vocabulary="reports"),
        train=TrainConfig(epochs=4, batch_size=8, lr=1e-4, lr_schedule="cosine", calibration="platt"),
        pretrain=PretrainConfig(n_patients=48, epochs=4),
    ),
    # cpu: text_layers 5 is MiniLM's best layer for an inner-validation probe (ichpro.probes, notebook
    # 07); CMAF skips SoftPool, which would leave 4 cells of the 2x4x4 grid to attend over.
    "cpu": Profile(
        "cpu",
        cohort="cpu",
        preprocess=PreprocessConfig(spatial_size=(32, 64, 64)),
        model=ModelConfig(vision_depth=18, vision_widths=(16, 32, 64, 128), vision_no_max_pool=True,
                          text_encoder="minilm", text_layers=5, dim=64, grid=(2, 4, 4),
                          cmaf_pool=(1, 1, 1), heads=8, header_blocks=(2, 4, 8, 4), header_growth=16,
                          freeze_vision=True, freeze_text=True, comparator_input=(16, 32, 32)),
        loss=LossConfig(mlm_vocabulary="reports"),
        train=TrainConfig(epochs=12, batch_size=16, lr=1e-3, patience=4, lr_schedule="cosine",
                          calibration="platt"),
        pretrain=PretrainConfig(n_patients=200, epochs=8),
    ),
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


def cache_root() -> Path:
    """Where preprocessed CTs, encoder outputs and pretrained encoders are cached: $ICHPRO_CACHE or
    ``~/.cache/ichpro``."""
    return Path(os.environ.get("ICHPRO_CACHE") or Path.home() / ".cache" / "ichpro")


def _tuples(value):
    """JSON lists back to the tuples the configs use."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def profile_from_dict(record: dict) -> Profile:
    """Rebuild a Profile from ``dataclasses.asdict(profile)`` (e.g. a run's run.json)."""
    parts = {"preprocess": PreprocessConfig, "model": ModelConfig, "loss": LossConfig,
             "train": TrainConfig}
    fields_ = {k: cls(**{f: _tuples(v) for f, v in record[k].items()}) for k, cls in parts.items()}
    pretrain = record.get("pretrain")
    return Profile(name=record["name"], cohort=record["cohort"], **fields_,
                   pretrain=None if pretrain is None else PretrainConfig(**pretrain))
