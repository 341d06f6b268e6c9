"""Named profiles (smoke, cpu, paper) and the preprocessing configuration they share."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ichpro.errors import IchproError

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = REPO_ROOT / "data_synthetic"

#: The paper's CT window (official code): HU in [15, 400] mapped to [0, 1].
PAPER_WINDOW = (15.0, 400.0)
#: The common brain window, level 40 / width 80: HU in [0, 80].
BRAIN_WINDOW = (0.0, 80.0)

#: the command-line option of each config field a user sets there (named in the errors)
CLI_OPTIONS = {"TrainConfig.epochs": "--epochs", "TrainConfig.n_folds": "--folds",
               "TrainConfig.batch_size": "--batch-size", "TrainConfig.lr": "--lr",
               "TrainConfig.grad_accumulation": "--grad-accumulation", "TrainConfig.device": "--device",
               "TrainConfig.amp": "--amp", "ModelConfig.fusion": "--fusion",
               "ModelConfig.vision_dropout": "--vision-dropout", "LossConfig.terms": "--loss"}


def _check(config: Any, name: str, valid: Callable[[Any], bool], allowed: str) -> None:
    """Raise a one-sentence error naming the field (and its option) when ``valid`` rejects its value."""
    value = getattr(config, name)
    try:
        ok = bool(valid(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        field_name = f"{type(config).__name__}.{name}"
        option = f" ({CLI_OPTIONS[field_name]})" if field_name in CLI_OPTIONS else ""
        raise IchproError(f"{field_name}{option} is {value!r}: {allowed}")


def _choice(config: Any, name: str, choices: tuple) -> None:
    _check(config, name, lambda v: v in choices, f"use one of {_listed(choices)}")


def _listed(choices) -> str:
    return ", ".join(map(str, choices))


def _whole(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _wholes(n: int | None, low: int = 1) -> Callable[[Any], bool]:
    """A tuple of ``n`` (any number if None, at least one) whole numbers >= ``low``."""
    return lambda v: (isinstance(v, tuple) and len(v) == (n or len(v)) > 0
                      and all(_whole(low)(x) for x in v))


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


def _share(v: Any) -> bool:
    return isinstance(v, int | float) and 0 < v < 1


@dataclass(frozen=True)
class PreprocessConfig:
    """How a raw CT becomes the model's input tensor of shape (1, D, H, W)."""

    spatial_size: tuple[int, int, int] = (16, 64, 64)  # D (slices), H, W
    hu_window: tuple[float, float] = PAPER_WINDOW
    skull_strip: bool = True
    crop_to_brain: bool = True  # crop to the brain's bounding box before resizing

    def __post_init__(self):
        _check(self, "spatial_size", _wholes(3, 4), "give three whole numbers >= 4 (slices, height, width)")
        _check(self, "hu_window", lambda w: len(w) == 2 and w[0] < w[1],
               "give (low, high) in Hounsfield units with low < high, e.g. (15, 400)")


FUSION_STRUCTURES = ("self", "cross", "self-self", "cross-cross", "self-cross", "cross-self")
MODALITIES = ("both", "vision", "text")  # Table 1: the fused model and each encoder alone
TRT_KINDS = ("queries", "positional")
VISION_DEPTHS = (10, 18, 34, 50, 101, 152, 200)  # MONAI's 3D ResNets
COMPARATOR_SIZES = ("smoke", "cpu", "paper")


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
    # beyond the paper: the share of training samples whose vision grid is zeroed before the fusion
    # (modality dropout), so the fusion must learn to read the report as well as the CT
    vision_dropout: float = 0.0
    header_blocks: tuple[int, ...] = (6, 12, 24, 16)  # DenseNet-121
    header_growth: int = 32
    freeze_vision: bool = False
    freeze_text: bool = False
    comparator: str | None = None  # train this comparator (ichpro.models.comparators) instead of ICHPro
    comparator_input: tuple[int, int, int] | None = None  # CT size comparators train on (None: the profile's)
    comparator_size: str = "paper"  # the comparators' network sizes: smoke | cpu | paper

    def __post_init__(self):
        _choice(self, "vision_depth", VISION_DEPTHS)
        _check(self, "vision_widths", _wholes(4), "give four whole numbers >= 1, e.g. (64, 128, 256, 512)")
        _check(self, "text_layers", lambda v: v is None or _whole(1)(v), "use None (all layers) or >= 1")
        _check(self, "max_tokens", _whole(8), "use a whole number >= 8, e.g. 128")
        _choice(self, "trt", TRT_KINDS)
        _check(self, "dim", _whole(1), "use a whole number >= 1, e.g. 256")
        _check(self, "grid", _wholes(3), "give three whole numbers >= 1, e.g. (2, 8, 8)")
        _check(self, "cmaf_pool", lambda v: v is None or _wholes(3)(v),
               "use None or three whole numbers >= 1")
        _check(self, "heads", lambda v: _whole(1)(v) and self.dim % v == 0,
               f"use a whole number >= 1 that divides the fusion width dim = {self.dim}")
        _choice(self, "fusion", FUSION_STRUCTURES)
        _choice(self, "modality", MODALITIES)
        _check(self, "header_blocks", _wholes(None), "give whole numbers >= 1, e.g. (6, 12, 24, 16)")
        _check(self, "header_growth", _whole(1), "use a whole number >= 1, e.g. 32")
        _check(self, "vision_dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
               "use a share in [0, 1), e.g. 0.5 (0: off)")
        _check(self, "comparator_input", lambda v: v is None or _wholes(3, 4)(v),
               "use None or three whole numbers >= 4")
        _choice(self, "comparator_size", COMPARATOR_SIZES)


MLM_VOCABULARIES = ("full", "reports")
CALIBRATIONS = ("none", "platt")  # TrainConfig.calibration (ichpro.calibration)
LR_SCHEDULES = ("constant", "cosine")
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: loss-term names (their functions: ichpro.losses); the supervised ones train the prognosis head
LOSS_TERMS = ("ce", "imima", "sdm", "mlm", "blend", "cmpm", "cmfa", "numbers")
SUPERVISED_TERMS = ("ce", "blend")



def loss_terms(terms) -> tuple[tuple[str, float], ...]:
    """Loss terms as (name, float weight) pairs, checked: known names, each once, finite weights >= 0."""
    if not terms:
        raise IchproError(f"no loss terms given (--loss); choose some of {_listed(LOSS_TERMS)}")
    seen: set[str] = set()
    for name, weight in terms:
        if name not in LOSS_TERMS:
            raise IchproError(f"unknown loss term {name!r} (--loss); choose among {_listed(LOSS_TERMS)}")
        if name in seen:
            raise IchproError(f"loss term {name!r} is given twice (--loss)")
        if not (_positive(weight) or weight == 0):
            raise IchproError(f"weight of loss term {name!r} (--loss) must be finite and >= 0, got {weight}")
        seen.add(name)
    return tuple((name, float(weight)) for name, weight in terms)


@dataclass(frozen=True)
class LossConfig:
    """Named loss terms and their weights, plus the terms' hyper-parameters."""

    terms: tuple[tuple[str, float], ...] = (("ce", 1.0), ("imima", 1.0), ("sdm", 1.0), ("mlm", 1.0))
    temperature: float = 0.07  # tau of IMIMA and SDM
    mlm_probability: float = 0.15
    mlm_variants: int = 4  # masked copies of each report encoded once when the text encoder is frozen
    mlm_vocabulary: str = "full"  # MLM softmax over: full (the encoder's vocabulary) | reports (their words)

    def __post_init__(self):
        object.__setattr__(self, "terms", loss_terms(self.terms))
        _check(self, "terms", lambda t: any(n in SUPERVISED_TERMS and w > 0 for n, w in t),
               f"the prognosis head learns only from {' or '.join(SUPERVISED_TERMS)}: give one of them "
               "a weight > 0, e.g. 'ce=1,sdm=0.5'")
        _check(self, "temperature", _positive, "use a temperature > 0, e.g. 0.07")
        _check(self, "mlm_probability", _share, "use a share between 0 and 1, e.g. 0.15")
        _check(self, "mlm_variants", _whole(1), "use a whole number >= 1, e.g. 4")
        _choice(self, "mlm_vocabulary", MLM_VOCABULARIES)


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
        _check(self, "epochs", _whole(1), "use a whole number >= 1, e.g. 12")
        _check(self, "batch_size", _whole(1), "use a whole number >= 1, e.g. 16")
        _check(self, "lr", _positive, "use a learning rate > 0, e.g. 1e-3")
        _check(self, "weight_decay", lambda v: v == 0 or _positive(v), "use a weight decay >= 0")
        _check(self, "n_folds", _whole(2), "use at least 2 folds, e.g. 5")
        _check(self, "val_fraction", _share, "use a share between 0 and 1, e.g. 0.2")
        _check(self, "patience", lambda v: v is None or _whole(1)(v), "use None (no early stop) or >= 1")
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _check(self, "grad_accumulation", _whole(1), "use a whole number >= 1, e.g. 1")
        _choice(self, "calibration", CALIBRATIONS)
        _choice(self, "amp", AMP_MODES)
        _check(self, "device", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v),
               "use auto, cpu, cuda or cuda:N")


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
    radiology_weight: float = 0.5  # IVH, midline shift and location read from the pooled features

    def __post_init__(self):
        _check(self, "n_patients", _whole(4), "use a whole number >= 4, e.g. 96")
        _check(self, "epochs", _whole(1), "use a whole number >= 1, e.g. 6")
        _check(self, "batch_size", _whole(1), "use a whole number >= 1, e.g. 8")
        _check(self, "lr", _positive, "use a learning rate > 0, e.g. 3e-3")
        _check(self, "held_out", _share, "use a share between 0 and 1, e.g. 0.2")
        _check(self, "volume_weight", lambda v: v == 0 or _positive(v), "use a weight >= 0, e.g. 0.5")
        _check(self, "radiology_weight", lambda v: v == 0 or _positive(v), "use a weight >= 0, e.g. 0.5")


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
                          header_blocks=(2, 2, 2, 2), header_growth=8, vision_dropout=0.5,
                          freeze_vision=True, freeze_text=True, comparator_input=(16, 32, 32),
                          comparator_size="smoke"),
        loss=LossConfig(mlm_vocabulary="reports"),
        train=TrainConfig(epochs=4, batch_size=8, lr=1e-4, lr_schedule="cosine", calibration="platt"),
        pretrain=PretrainConfig(n_patients=48, epochs=4),
    ),
    # cpu: text_layers 5 is MiniLM's best layer for an inner-validation probe (ichpro.probes, notebook
    # 07); CMAF skips SoftPool, which would leave 4 cells of the 2x4x4 grid to attend over. Pretraining
    # runs batches of 4 for 12 epochs (480 steps; batches of 8 for 10 epochs made 200 and stopped at
    # held-out soft Dice 0.57); the findings head is on by default (PretrainConfig.radiology_weight).
    # lr 1e-3, chosen on a design cohort (bench/design_cohort.py, seed 2): the mean of the three Table 1
    # rows' best inner-validation AUC is 0.824 at 3e-4 (text only learns too slowly: 0.742), 0.840
    # at 1e-3 and 0.844 at 3e-3, a tie within the folds' noise; 1e-3 is the smaller of the two.
    # vision_dropout 0.5, on the same design cohort at lr 1e-3: ICHPro's best inner-validation AUC is
    # 0.867 without, 0.883 at 0.3, 0.877 at 0.5, 0.869 at 0.7; 0.3 and 0.5 tie within the folds' noise
    # (an earlier trial ranked them the other way), and the tie goes to the rate whose model reads the
    # report more: a report edit (GCS -> 5, age -> 85) moves its P(bad) by +0.144 against +0.097
    # (+0.056 without; the cohort's outcome model: +0.556).
    # The cpu profile trains the paper's model: VTMF, nothing added, with the vision dropout chosen for
    # it above (0.5). The companion's own variant adds the "numbers" term (age and GCS regressed from
    # the fused representation, weight 3) and drops the dropout, both chosen on the same design cohort
    # (docs/cpu_settings.md); it is a row of its own (ichpro.experiments.VARIANT).
    "cpu": Profile(
        "cpu",
        cohort="cpu",
        preprocess=PreprocessConfig(spatial_size=(32, 64, 64)),
        model=ModelConfig(vision_depth=18, vision_widths=(16, 32, 64, 128), vision_no_max_pool=True,
                          text_encoder="minilm", text_layers=5, dim=64, grid=(2, 4, 4),
                          cmaf_pool=(1, 1, 1), heads=8, header_blocks=(2, 4, 8, 4), header_growth=16,
                          vision_dropout=0.5, freeze_vision=True, freeze_text=True,
                          comparator_input=(16, 32, 32), comparator_size="cpu"),
        loss=LossConfig(mlm_vocabulary="reports"),
        train=TrainConfig(epochs=12, batch_size=16, lr=1e-3, lr_schedule="cosine", calibration="platt"),
        pretrain=PretrainConfig(n_patients=200, epochs=12, batch_size=4),
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
