"""Vision-encoder pretraining on a separate synthetic cohort: haematoma segmentation, volume regression
and the radiological findings a reader reports.

MedicalNet pretrains 3D ResNets on segmentation; here the profile's encoder learns, on phantom CTs
of its own cohort (the evaluation cohort's spec, drawn with another seed: no shared patient), to
segment the blood (parenchymal haematoma and intraventricular channels, soft Dice + BCE on the
preprocessed masks), to regress the haematoma volume (log mL) from its pooled feature map and, with
``radiology_weight`` > 0, to read the other image findings of the ICH score from the same pooled
features: intraventricular extension (BCE), midline shift (MSE on log1p mm) and the haematoma's
location (cross-entropy over deep, lobar, cerebellar, brainstem). The
segmentation head is a light decoder *without skip connections* (three steps of a 3×3×3 convolution
and ×2 up-sampling from ``layer4``'s map, then a 1×1×1 convolution), so the encoder's last feature
map itself must carry where the blood is, down to the shape inside each of its cells (the first
version was two convolutions on the coarse map; ``bench/pretrain_cost.py`` times the two). Its last
bias starts at the log-odds of a rare voxel (-4), so the first epochs learn the blood rather than
the background.

An output folder holds ``vision.safetensors`` (the encoder, loadable by ``VisionEncoder.load_weights``),
``card.json`` / ``card.md`` (cohort, seed, epochs, held-out Dice and volume MAE, time) and, while
training, a per-epoch checkpoint for ``resume``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ichpro.checkpoints import load_optimizer, load_weights, save_optimizer, save_weights
from ichpro.cohort import LOCATIONS, ensure_cohort
from ichpro.config import PretrainConfig, Profile, cache_root
from ichpro.data import config_hash, preprocess_transforms
from ichpro.errors import IchproError
from ichpro.files import file_digest, read_json, write_json
from ichpro.models.encoders import VisionEncoder
from ichpro.runtime import cosine_lr

PRETRAIN_VERSION = 5
WEIGHTS_FILE = "vision.safetensors"
BLOOD_PRIOR_LOGIT = -4.0  # the segmentation head's initial log-odds of blood in a voxel (about 2 %)


#: the radiological findings read from the pooled features: name -> outputs of the findings head
FINDINGS = {"ivh": 1, "midline_shift": 1, "location": len(LOCATIONS)}


class PretrainNet(nn.Module):
    """The profile's vision encoder with a blood-segmentation decoder, a volume head and, when the
    profile's ``radiology_weight`` > 0, a findings head (IVH, midline shift, location)."""

    def __init__(self, profile: Profile):
        super().__init__()
        cfg = profile.model
        self.encoder = VisionEncoder(cfg.vision_depth, cfg.vision_widths, cfg.vision_no_max_pool)
        channels = self.encoder.out_channels
        widths = (channels, 64, 32, 16)
        steps = [layer for i, o in zip(widths, widths[1:]) for layer in (
            nn.Conv3d(i, o, 3, padding=1), nn.BatchNorm3d(o), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False))]
        self.segment = nn.Sequential(*steps, nn.Conv3d(widths[-1], 2, 1))
        nn.init.constant_(self.segment[-1].bias, BLOOD_PRIOR_LOGIT)
        self.volume = nn.Linear(channels, 1)
        weight = profile.pretrain.radiology_weight if profile.pretrain is not None else 0.0
        self.findings = nn.Linear(channels, sum(FINDINGS.values())) if weight > 0 else None

    def forward(self, ct: torch.Tensor) -> dict[str, torch.Tensor]:
        """``blood``: logits (B, 2, D, H, W) at the input's size; ``volume``: predicted log1p(haematoma
        mL) (B,); with the findings head, ``ivh`` and ``midline_shift`` (B,) (a logit and log1p mm)
        and ``location`` logits (B, 4)."""
        features = self.encoder(ct)
        pooled = features.mean(dim=(2, 3, 4))
        out = {"blood": F.interpolate(self.segment(features), size=ct.shape[2:], mode="trilinear",
                                      align_corners=False),
               "volume": self.volume(pooled)[:, 0]}
        if self.findings is not None:
            parts = self.findings(pooled).split(list(FINDINGS.values()), dim=1)
            out.update({"ivh": parts[0][:, 0], "midline_shift": parts[1][:, 0], "location": parts[2]})
        return out


def channels_last(ct: torch.Tensor) -> torch.Tensor:
    """A (B, 1, D, H, W) batch in the channels-last-3D memory layout."""
    return ct.contiguous(memory_format=torch.channels_last_3d)


def pretrain_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], volume_weight: float,
                  radiology_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Dice + BCE on the blood shares, plus ``volume_weight`` x MSE on log1p(mL), plus (when the
    net has a findings head) ``radiology_weight`` x (IVH BCE + midline-shift MSE on log1p mm + location
    cross-entropy). ``target`` holds ``blood`` shares, ``volume_ml`` and, for the findings, ``ivh``
    (0/1), ``midline_shift_mm`` and ``location`` (an index into ``LOCATIONS``)."""
    logits, blood = out["blood"], target["blood"]
    probs = logits.sigmoid()
    dims = (2, 3, 4)
    dice = 1 - (2 * (probs * blood).sum(dims) + 1) / (probs.sum(dims) + blood.sum(dims) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, blood)
    mse = F.mse_loss(out["volume"], torch.log1p(target["volume_ml"]))
    total = dice.mean() + bce + volume_weight * mse
    terms = {"dice_loss": dice.mean().item(), "bce": bce.item(), "volume_mse": mse.item()}
    if "location" in out:
        findings = (F.binary_cross_entropy_with_logits(out["ivh"], target["ivh"])
                    + F.mse_loss(out["midline_shift"], torch.log1p(target["midline_shift_mm"]))
                    + F.cross_entropy(out["location"], target["location"]))
        total = total + radiology_weight * findings
        terms["findings"] = findings.item()
    return total, terms


def pretrained_path(profile: Profile) -> Path:
    """Where this profile's pretrained encoder lives in the cache (keyed by everything it depends on)."""
    if profile.pretrain is None:
        raise IchproError(f"profile {profile.name!r} has no vision pretraining configured")
    key = config_hash({"version": PRETRAIN_VERSION, "pretrain": asdict(profile.pretrain),
                       "cohort": profile.cohort, "preprocess": asdict(profile.preprocess),
                       "vision": [profile.model.vision_depth, profile.model.vision_widths,
                                  profile.model.vision_no_max_pool]})
    return cache_root() / "pretrained" / f"{profile.name}-{key}" / WEIGHTS_FILE


def with_vision_weights(profile: Profile) -> Profile:
    """The profile with its vision weights resolved: a given file wins, else its pretrained encoder.

    Raises when the pretrained encoder has not been made yet (see :func:`ensure_pretrained`).
    """
    if profile.model.vision_weights is not None or profile.pretrain is None:
        return profile
    path = pretrained_path(profile)
    if not intact(path):
        raise IchproError(f"the pretrained vision encoder of profile {profile.name!r} is missing or damaged "
                          f"({path}); create it with: ichpro pretrain-vision --profile {profile.name}")
    return replace(profile, model=replace(profile.model, vision_weights=str(path)))


def pretrained_ready(profile: Profile) -> bool:
    """Whether the profile needs no pretraining: it names its own weights, or its encoder is cached."""
    uses_pretraining = profile.model.vision_weights is None and profile.pretrain is not None
    return not uses_pretraining or intact(pretrained_path(profile))


def ensure_pretrained(profile: Profile, quiet: bool = False) -> None:
    """Pretrain the profile's vision encoder if it uses one and it is not in the cache yet."""
    if profile.model.vision_weights is None and profile.pretrain is not None:
        path = pretrained_path(profile)
        if path.is_file() and not intact(path):
            print(f"the pretrained encoder {path} is damaged (its hash is not its card's): pretraining it "
                  "again", file=sys.stderr)
            shutil.rmtree(path.parent)
        if not path.is_file():
            if not quiet:
                print(f"pretraining the {profile.name} profile's vision encoder once, into {path.parent}")
            pretrain_vision(profile, path.parent, resume=True, quiet=quiet)


def intact(weights: Path) -> bool:
    """Whether a pretrained encoder's weights exist with the hash its card recorded."""
    card = weights.parent / "card.json"
    return weights.is_file() and card.is_file() and (
        read_json(card, "the pretraining card").get("sha256") == file_digest(weights))


def pretraining_cohort(profile: Profile, quiet: bool = False) -> Path:
    """Generate (once) the pretraining cohort: the profile's spec with the pretraining seed."""
    cfg = profile.pretrain
    folder = cache_root() / "cohorts" / f"{profile.cohort}-pretrain-{cfg.seed}-{cfg.n_patients}"
    return ensure_cohort(profile.cohort, folder, seed=cfg.seed, n_patients=cfg.n_patients, progress=not quiet)


def load_examples(profile: Profile, cohort: Path, quiet: bool = False) -> dict[str, torch.Tensor]:
    """Preprocessed CTs, blood shares and the true haematoma volumes, IVH, midline shifts and
    locations of the pretraining cohort."""
    manifest = pd.read_csv(cohort / "manifest.csv")
    truth = pd.read_csv(cohort / "truth.csv").set_index("patient_id")
    transform = preprocess_transforms(profile.preprocess, with_blood=True)
    cts, blood = [], []
    for row in tqdm(manifest.itertuples(), total=len(manifest), desc="preprocessing", disable=quiet,
                    leave=False):
        item = transform({"ct": str(cohort / row.ct_path), "blood": str(cohort / row.mask_path)})
        cts.append(item["ct"])
        blood.append(item["blood"].half())
    truth = truth.loc[manifest["patient_id"]]
    numbers = {name: torch.from_numpy(truth[name].to_numpy(np.float32))
               for name in ("volume_ml", "ivh", "midline_shift_mm")}
    location = torch.tensor([LOCATIONS.index(name) for name in truth["location"]])
    return {"ct": torch.stack(cts), "blood": torch.stack(blood), **numbers, "location": location}


def batch_targets(data: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    """The targets of the examples ``idx`` (blood shares as float32)."""
    return {name: (value[idx].float() if name == "blood" else value[idx])
            for name, value in data.items() if name != "ct"}


def pretrain_vision(profile: Profile, out: str | Path, *, resume: bool = False, quiet: bool = False,
                    cohort: Path | None = None) -> dict:
    """Pretrain the profile's vision encoder into ``out``; returns the card (also written as JSON/MD)."""
    cfg: PretrainConfig | None = profile.pretrain
    if cfg is None:
        raise IchproError(f"profile {profile.name!r} has no vision pretraining configured")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cohort = pretraining_cohort(profile, quiet) if cohort is None else Path(cohort)
    data = load_examples(profile, cohort, quiet)
    n = len(data["ct"])
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_held_out = max(1, round(cfg.held_out * n))
    held_out, train = order[:n_held_out], order[n_held_out:]

    torch.manual_seed(cfg.seed)
    net = PretrainNet(profile).to(memory_format=torch.channels_last_3d)  # ~30 % faster 3D convs on CPU
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    state = {"epoch": 0, "history": [], "seconds": 0.0, "best_epoch": 0}
    if resume and (out / "state.json").is_file():
        state = json.loads((out / "state.json").read_text())
        load_weights(out / "checkpoint.safetensors", net)
        load_optimizer(out / "optimizer.safetensors", state.pop("optimizer"), optimizer)

    for epoch in tqdm(range(state["epoch"] + 1, cfg.epochs + 1), desc="pretraining vision", disable=quiet):
        start = time.perf_counter()
        net.train()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        shuffled = train[torch.randperm(len(train), generator=generator).numpy()]
        sums: dict[str, float] = {}
        for begin in range(0, len(shuffled), cfg.batch_size):
            idx = shuffled[begin:begin + cfg.batch_size]
            total, terms = pretrain_loss(net(channels_last(data["ct"][idx])), batch_targets(data, idx),
                                         cfg.volume_weight, cfg.radiology_weight)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value * len(idx)
        state["seconds"] += time.perf_counter() - start
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, **{k: round(v / len(train), 5) for k, v in sums.items()},
                                 **evaluate(net, data, held_out, cfg)})
        if state["best_epoch"] == 0 or (state["history"][-1]["held_out_loss"]
                                        < state["history"][state["best_epoch"] - 1]["held_out_loss"]):
            state["best_epoch"] = epoch
            save_weights(out / "best.safetensors", net.encoder)
        save_weights(out / "checkpoint.safetensors", net)
        meta = save_optimizer(out / "optimizer.safetensors", optimizer)
        write_json(out / "state.json", {**state, "optimizer": meta})

    shutil.copyfile(out / "best.safetensors", out / WEIGHTS_FILE)
    card = {"profile": profile.name, "cohort_spec": profile.cohort, "pretrain": asdict(cfg),
            "train_patients": len(train), "held_out_patients": len(held_out),
            "best_epoch": state["best_epoch"], "held_out": state["history"][state["best_epoch"] - 1],
            "history": state["history"],
            "seconds": round(state["seconds"], 1), "weights": WEIGHTS_FILE,
            "sha256": file_digest(out / WEIGHTS_FILE)}
    write_json(out / "card.json", card)
    (out / "card.md").write_text(card_markdown(card))
    return card


@torch.no_grad()
def evaluate(net: PretrainNet, data: dict[str, torch.Tensor], idx: np.ndarray, cfg: PretrainConfig
             ) -> dict[str, float]:
    """Held-out pretraining loss (which selects the epoch kept); haematoma soft Dice (predicted
    probabilities against the voxel shares) and Dice (the map thresholded at 0.5 against the voxels
    at least half haematoma); volume MAE (mL); with the findings head, IVH and location accuracy and
    midline-shift MAE (mm)."""
    net.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    loss = 0.0
    for begin in range(0, len(idx), cfg.batch_size):
        part = idx[begin:begin + cfg.batch_size]
        out, target = net(channels_last(data["ct"][part])), batch_targets(data, part)
        total, _ = pretrain_loss(out, target, cfg.volume_weight, cfg.radiology_weight)
        loss += total.item() * len(part) / len(idx)
        probs, haematoma = out["blood"][:, 0].sigmoid(), target["blood"][:, 0]
        found = {"held_out_dice": soft_dice(probs, haematoma),
                 "held_out_hard_dice": soft_dice((probs > 0.5).float(), (haematoma >= 0.5).float()),
                 "held_out_volume_mae_ml": (torch.expm1(out["volume"]) - target["volume_ml"]).abs()}
        if "location" in out:
            found["held_out_ivh_accuracy"] = ((out["ivh"] > 0).float() == target["ivh"]).float()
            shift_mm = torch.expm1(out["midline_shift"])
            found["held_out_shift_mae_mm"] = (shift_mm - target["midline_shift_mm"]).abs()
            found["held_out_location_accuracy"] = (out["location"].argmax(1) == target["location"]).float()
        for name, values in found.items():
            parts.setdefault(name, []).append(values)
    return {"held_out_loss": round(loss, 5),
            **{name: round(torch.cat(values).mean().item(), 4) for name, values in parts.items()}}


def soft_dice(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice of each volume of a batch (B, D, H, W) of probabilities against voxel shares (with
    0/1 volumes, the Dice)."""
    dims = (1, 2, 3)
    overlap = (predicted * target).sum(dim=dims)
    return 2 * overlap / (predicted.sum(dim=dims) + target.sum(dim=dims)).clamp_min(1e-6)


def card_markdown(card: dict) -> str:
    """A human-readable card of a pretrained encoder."""
    cfg, result = card["pretrain"], card["held_out"]
    findings = cfg.get("radiology_weight", 0) > 0
    task = ("; the findings IVH, midline shift and location from the pooled features (weight "
            f"{cfg['radiology_weight']})" if findings else "")
    read = (f"; IVH accuracy {result['held_out_ivh_accuracy']:.2f}, midline-shift MAE "
            f"{result['held_out_shift_mae_mm']:.2f} mm, location accuracy "
            f"{result['held_out_location_accuracy']:.2f}" if findings else "")
    return (f"# Pretrained vision encoder: profile `{card['profile']}`\n\n"
            f"* Task: blood segmentation (haematoma + IVH, soft Dice + BCE) and haematoma volume "
            f"regression (log mL, weight {cfg['volume_weight']}){task}.\n"
            f"* Data: synthetic cohort spec `{card['cohort_spec']}`, seed {cfg['seed']} (not the "
            f"evaluation cohort's), {card['train_patients']} training and {card['held_out_patients']} "
            "held-out patients.\n"
            f"* Training: {cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam lr {cfg['lr']} with a "
            f"cosine schedule, {card['seconds']} s; kept: epoch {card['best_epoch']}, the lowest "
            "held-out loss.\n"
            f"* Held out: haematoma soft Dice {result['held_out_dice']:.3f} and Dice "
            f"{result['held_out_hard_dice']:.3f} (map thresholded at 0.5), volume MAE "
            f"{result['held_out_volume_mae_ml']:.2f} mL{read}.\n"
            f"* Weights: `{card['weights']}` (load with `VisionEncoder.load_weights`).\n")
