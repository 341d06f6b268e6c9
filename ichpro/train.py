"""Training engine: fit one fold, patient-level cross-validation, checkpoints and resume, AMP, DDP.

A run folder holds everything a run needs to be resumed and audited::

    run.json                 config, seed, config hash, manifest checksum, versions, git commit
    metrics.csv              one row per (fold, epoch): every loss term, validation loss and AUC
    oof_predictions.csv      patient_id, fold, p_bad, label, p_bad_uncalibrated: every patient once
    fold{k}/last.safetensors, fold{k}/optimizer.safetensors, fold{k}/state.json   (each epoch)
    fold{k}/best.safetensors                                                       (selected epoch)
    fold{k}/calibration.json  the selected model's Platt scaling (TrainConfig.calibration "platt")
    fold{k}/predictions.csv                                                        (fold finished)

``p_bad`` in the predictions is the recalibrated P(bad outcome) (:mod:`ichpro.calibration`),
``p_bad_uncalibrated`` the model's own softmax.

Each fold re-initialises the model, selects its checkpoint on an inner validation split of its
training patients (never on the test fold) and predicts its test fold with that checkpoint.
Checkpoints are written atomically (temporary file, then rename) as safetensors plus JSON; nothing
is ever unpickled. With frozen encoders (the smoke and cpu profiles) every patient is encoded once
and the folds train only the fusion, header and loss-specific parts on those features.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

from ichpro.calibration import IDENTITY, PlattScaling, margin
from ichpro.clinical import CLINICAL_BASELINES, clinical_baseline_cv, clinical_fields
from ichpro.config import Profile
from ichpro.data import config_hash, haematoma_volumes, make_dataset, make_folds
from ichpro.errors import IchproError
from ichpro.features import cache_key, cached, files_digest, tensors_digest, weights_digest
from ichpro.losses import CompositeLoss
from ichpro.metrics import classification_metrics
from ichpro.models import ICHPro, build_model
from ichpro.models.comparators import (
    SIZES,
    Comparator,
    build_comparator,
    clinical_tensor,
    count_parameters,
    image_report,
    measure_ct_file,
    template_tokens,
)
from ichpro.pretrain import ensure_pretrained, with_vision_weights
from ichpro.text import TextBackbone, load_text_backbone, mask_tokens, tokenize

STATE_VERSION = 1
OOF_FILE = "oof_predictions.csv"  # a run's out-of-fold predictions: every patient once
CALIBRATION_FILE = "calibration.json"  # a fold's PlattScaling, beside its best.safetensors


# --------------------------------------------------------------------------- devices and precision


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IchproError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision: bf16 (or fp16 where bf16 is unsupported) on CUDA with ``auto``; opt-in bf16 on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in ("bf16", "fp16"):
        raise IchproError(f"amp must be auto, bf16, fp16 or off, not {amp!r}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (from 1): a cosine schedule from ``base`` to 0 after ``epochs``."""
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and shows progress."""
        return self.rank == 0


def barrier(dist_info: Distributed) -> None:
    """Wait for every rank (after rank 0 wrote files the others will read)."""
    if dist_info.world > 1:
        dist.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


# --------------------------------------------------------------------------- batches


class BatchSource:
    """Model batches for lists of patient indices: CT + tokens, or the frozen encoders' outputs.

    After :meth:`precompute`, a frozen vision encoder's feature maps replace the CTs and a frozen
    text encoder's token states (and masked-report variants for MLM) replace the reports; see
    :mod:`ichpro.features` for the disk cache. :meth:`load_comparator_inputs` holds what a
    comparator reads in memory instead (see :mod:`ichpro.models.comparators` for the batch keys).
    """

    def __init__(self, manifest: pd.DataFrame, profile: Profile, text: TextBackbone,
                 cache_dir: Path | None):
        self.profile, self.tokenizer, self.manifest = profile, text.tokenizer, manifest
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.labels = torch.tensor(manifest["label"].to_numpy(), dtype=torch.long)
        self.patient_ids = manifest["patient_id"].astype(str).tolist()
        self.ct_paths = manifest["ct_path"].astype(str).tolist()
        self.tokens = tokenize(text.tokenizer, manifest["report"].tolist(), profile.model.max_tokens)
        self.dataset = make_dataset(manifest, profile.preprocess,
                                    None if cache_dir is None else self.cache_dir / "ct")
        self.features: dict[str, torch.Tensor] = {}  # batch key -> (N, ...) per patient
        self.masked: dict[str, torch.Tensor] = {}  # masked_text_states, mlm_labels: (variants, N, ...)
        self.cache_hits: dict[str, bool] = {}

    def report_token_ids(self, idx: Iterable[int]) -> torch.Tensor:
        """The distinct token ids of the reports of patients ``idx`` (padding excluded)."""
        idx = list(idx)
        return torch.unique(self.tokens["input_ids"][idx][self.tokens["attention_mask"][idx].bool()])

    def cts(self, idx: Iterable[int]) -> torch.Tensor:
        """The preprocessed CTs (B, 1, D, H, W) of the patients ``idx``, from the dataset (and its cache)."""
        return torch.stack([self.dataset[i]["ct"] for i in idx])

    @torch.no_grad()
    def precompute(self, model: ICHPro, device: torch.device, batch_size: int, seed: int,
                   quiet: bool = False) -> None:
        """Encode every patient once with the model's frozen encoders (from the disk cache if there)."""
        model.eval()
        cfg, n = self.profile.model, len(self.labels)
        chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]

        def encode(name: str, fn) -> torch.Tensor:
            return torch.cat([fn(idx).cpu() for idx in tqdm(chunks, desc=f"encoding {name}",
                                                            disable=quiet, leave=False)])

        def feature_maps(idx: list[int]) -> torch.Tensor:
            return model.vision(self.cts(idx).to(device))

        if cfg.freeze_vision and cfg.modality != "text":
            key = cache_key("vision", weights=weights_digest(model.vision),
                            preprocess=asdict(self.profile.preprocess), cts=files_digest(self.ct_paths))
            self._store(self.features, key, lambda: {"vision_features": encode("CTs", feature_maps)})
        if not cfg.freeze_text or cfg.modality == "vision":
            return
        text_weights = weights_digest(model.text)
        ids, mask = self.tokens["input_ids"], self.tokens["attention_mask"]

        def states(input_ids: torch.Tensor) -> torch.Tensor:
            return encode("reports", lambda idx: model.text(input_ids[idx].to(device), mask[idx].to(device)))

        key = cache_key("text", weights=text_weights, tokens=tensors_digest([ids, mask]))
        self._store(self.features, key, lambda: {"text_states": states(ids)})
        if model.mlm is not None:
            generator = torch.Generator().manual_seed(seed)
            variants = [mask_tokens(ids, self.tokenizer, self.profile.loss.mlm_probability, generator)
                        for _ in range(self.profile.loss.mlm_variants)]
            masked_ids = torch.stack([v[0] for v in variants])
            self.masked["mlm_labels"] = torch.stack([v[1] for v in variants])
            key = cache_key("masked", weights=text_weights, tokens=tensors_digest([masked_ids, mask]))
            self._store(self.masked, key, lambda: {"masked_text_states": torch.stack(
                [states(variant) for variant in masked_ids])})

    @torch.no_grad()
    def load_comparator_inputs(self, inputs: tuple[str, ...], quiet: bool = False) -> None:
        """Hold the per-patient tensors a comparator reads (its ``INPUTS``) in memory.

        ``ct``: the preprocessed CTs resized (area interpolation) to ``ModelConfig.comparator_input``;
        ``gcs``, ``age``: raw values; ``volume_ml``: the true haematoma volume
        (:func:`ichpro.data.haematoma_volumes`); ``image_text``: the template text of
        :func:`ichpro.models.comparators.image_report` measured on each CT file. CTs and template
        text go through the disk cache. ``clinical`` is set per fold by :meth:`standardize_clinical`.
        """
        n, size = len(self.labels), self.profile.model.comparator_input
        if "ct" in inputs:
            def load_cts() -> dict[str, torch.Tensor]:
                cts = self.cts(tqdm(range(n), desc="loading CTs", disable=quiet, leave=False))
                resized = size is not None and tuple(cts.shape[2:]) != tuple(size)
                return {"ct": F.interpolate(cts, size=tuple(size), mode="area") if resized else cts}

            key = cache_key("comparator-ct", preprocess=asdict(self.profile.preprocess), size=size,
                            cts=files_digest(self.ct_paths))
            self._store(self.features, key, load_cts)
        if "image_text" in inputs:
            def template_text() -> dict[str, torch.Tensor]:
                texts = [image_report(measure_ct_file(path))
                         for path in tqdm(self.ct_paths, desc="measuring CTs", disable=quiet, leave=False)]
                ids, mask = template_tokens(texts)
                return {"image_text_ids": ids, "image_text_mask": mask}

            key = cache_key("image-text", cts=files_digest(self.ct_paths))
            self._store(self.features, key, template_text)
        fields = clinical_fields(self.manifest) if {"gcs", "age"} & set(inputs) else None
        for name in ("gcs", "age"):
            if name in inputs:
                missing = fields[name].isna()
                if missing.any():
                    raise IchproError(f"{int(missing.sum())} patient(s) have no {name} (column or report), "
                                      f"e.g. {self.manifest['patient_id'][missing].iloc[0]}: this comparator "
                                      f"predicts {name} and needs it for every patient")
                self.features[name] = torch.tensor(fields[name].to_numpy(), dtype=torch.float32)
        if "volume_ml" in inputs:
            self.features["volume_ml"] = torch.tensor(haematoma_volumes(self.manifest), dtype=torch.float32)

    def standardize_clinical(self, train: np.ndarray) -> None:
        """The ``clinical`` batch tensor, standardized with the mean and std of the ``train`` patients."""
        _, stats = clinical_tensor(self.manifest.iloc[train])
        self.features["clinical"] = clinical_tensor(self.manifest, stats)[0]

    def _store(self, into: dict[str, torch.Tensor], key: str, compute) -> None:
        tensors, self.cache_hits[key.split("-")[0]] = cached(self.cache_dir, key, compute)
        into.update(tensors)

    def batch(self, idx: list[int], device: torch.device, epoch: int | None = None) -> dict[str, Any]:
        """The batch of patients ``idx`` (indices into the manifest).

        With cached masked-report variants, ``epoch`` (from 1) picks the variant the MLM term uses.
        """
        batch = {k: v[idx].to(device) for k, v in {**self.tokens, **self.features}.items()}
        if not {"ct", "vision_features"} & batch.keys() and self.profile.model.modality != "text":
            batch["ct"] = self.cts(idx).to(device)
        if self.masked and epoch is not None:
            variant = (epoch - 1) % self.profile.loss.mlm_variants
            batch.update({k: v[variant, idx].to(device) for k, v in self.masked.items()})
        batch["labels"] = self.labels[idx].to(device)
        return batch


def batches(indices: np.ndarray, batch_size: int, generator: torch.Generator | None,
            dist_info: Distributed = Distributed()) -> Iterator[list[int]]:
    """Index batches: shuffled when a generator is given, each rank taking its share."""
    if generator is not None:
        indices = indices[torch.randperm(len(indices), generator=generator).numpy()]
    global_batch = batch_size * dist_info.world
    for start in range(0, len(indices), global_batch):
        chunk = indices[start:start + global_batch]
        share = chunk[dist_info.rank::dist_info.world]
        if len(share):
            yield share.tolist()


# --------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=str) + "\n"))


def frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of frozen encoders: rebuilt from the seed or weights file, not saved."""
    cfg = getattr(model, "cfg", None)
    prefixes = ("vision.",) if cfg is not None and cfg.freeze_vision else ()
    if cfg is not None and cfg.freeze_text:
        prefixes += ("text.", "mlm.word_embeddings.")
    return prefixes


def save_weights(path: Path, module: nn.Module) -> None:
    """Save a module's state dict as safetensors, atomically; frozen encoders and tied copies are left out."""
    skip = frozen_prefixes(module)
    state, seen = {}, set()
    for key, value in module.state_dict().items():
        if key.startswith(skip) or (value.numel() and value.data_ptr() in seen):
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().cpu().contiguous().clone()
    _atomic_write(path, lambda p: save_file(state, str(p)))


def load_weights(path: Path, module: nn.Module) -> None:
    """Load weights saved by :func:`save_weights` into a module built from the same config."""
    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    skip = frozen_prefixes(module)
    absent = [k for k in missing if not k.startswith(skip) and not k.endswith("word_embeddings.weight")]
    if absent or unexpected:
        raise IchproError(f"{path} does not fit this model: missing {absent[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer tensors to safetensors; returns the JSON-able rest (steps, hyper-parameters)."""
    state = optimizer.state_dict()
    tensors = {f"{idx}.{name}": value.detach().cpu().contiguous()
               for idx, entry in state["state"].items() for name, value in entry.items()
               if torch.is_tensor(value)}
    _atomic_write(path, lambda p: save_file(tensors, str(p)))
    return {"param_groups": state["param_groups"]}


def load_optimizer(path: Path, meta: dict, optimizer: torch.optim.Optimizer) -> None:
    """Restore an optimizer saved by :func:`save_optimizer`."""
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        idx, name = key.split(".", 1)
        entries.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": meta["param_groups"]})


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(encoded: str) -> None:
    raw = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))


# --------------------------------------------------------------------------- one fold


@dataclass
class Fold:
    """The patients of one fold: training, inner validation (checkpoint selection) and test."""

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_folds(labels: np.ndarray, n_folds: int, val_fraction: float, seed: int) -> list[Fold]:
    """Stratified test folds, each with a stratified inner validation split of its training part."""
    folds = make_folds(labels, n_folds, seed)
    result = []
    for k in range(n_folds):
        rest = np.flatnonzero(folds != k)
        train, val = train_test_split(rest, test_size=val_fraction, stratify=labels[rest],
                                      random_state=seed + k)
        result.append(Fold(k, np.sort(train), np.sort(val), np.flatnonzero(folds == k)))
    return result


def _loss_inputs(out, batch: dict[str, Any]) -> dict[str, Any]:
    return {"labels": batch["labels"], "logits": out.logits, "vision_embedding": out.vision_embedding,
            "text_embedding": out.text_embedding, "mlm_logits": out.mlm_logits,
            "mlm_labels": out.mlm_labels, "vision_logits": out.vision_logits,
            "text_logits": out.text_logits}


def comparator_size(profile: Profile) -> str:
    """The comparator size of a profile: its name when that is a size (smoke, cpu), else "paper"."""
    return profile.name if profile.name in SIZES else "paper"


def encoders_profile(profile: Profile) -> Profile:
    """The profile's ICHPro model: where a comparator that reads the frozen encoders' outputs gets them."""
    return replace(profile, model=replace(profile.model, comparator=None))


def fresh_model(profile: Profile, text: TextBackbone, seed: int) -> ICHPro | Comparator:
    """The model every fold starts from, seeded: ICHPro with its own copy of the text encoder, or the
    profile's comparator (``ModelConfig.comparator``) at :func:`comparator_size`.

    Frozen encoders are not checkpointed, so prediction rebuilds them through this same function.
    """
    if profile.model.comparator is not None:
        torch.manual_seed(seed)
        return build_comparator(profile.model.comparator, comparator_size(profile))
    profile = with_vision_weights(profile)
    torch.manual_seed(seed)
    return build_model(profile.model, copy.deepcopy(text.model), profile.loss)


class FoldTrainer:
    """Fits one fold with checkpoints every epoch; resumes from the fold folder if asked.

    The model is ICHPro with the profile's composite loss, or a comparator with its own loss.
    """

    def __init__(self, profile: Profile, source: BatchSource, text: TextBackbone, fold: Fold,
                 folder: Path, device: torch.device, seed: int, dist_info: Distributed, quiet: bool):
        self.profile, self.source, self.fold, self.folder = profile, source, fold, folder
        self.device, self.seed, self.dist, self.quiet = device, seed, dist_info, quiet
        self.tokenizer = text.tokenizer
        self.model = fresh_model(profile, text, seed).to(device)
        self.comparator = isinstance(self.model, Comparator)
        if not self.comparator and self.model.mlm is not None and profile.loss.mlm_vocabulary == "reports":
            self.model.mlm.restrict_vocabulary(source.report_token_ids(fold.train))
        # a comparator computes its own loss: the loss module is then empty
        self.loss = nn.Module() if self.comparator else CompositeLoss.from_config(profile.loss).to(device)
        params = [p for p in [*self.model.parameters(), *self.loss.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=profile.train.lr,
                                          weight_decay=profile.train.weight_decay)
        self.ddp_model: nn.Module = self.model
        if dist_info.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.state: dict[str, Any] = {"epoch": 0, "best_epoch": 0, "best_score": -np.inf,
                                      "stale": 0, "history": []}

    # -- persistence
    def resume(self) -> None:
        """Continue from the last completed epoch saved in the fold folder, if any."""
        state_path = self.folder / "state.json"
        if not state_path.is_file():
            return
        state = json.loads(state_path.read_text())
        load_weights(self.folder / "last.safetensors", self.model)
        load_weights(self.folder / "loss.safetensors", self.loss)
        load_optimizer(self.folder / "optimizer.safetensors", state.pop("optimizer"), self.optimizer)
        _set_rng_state(state.pop("rng"))
        self.state = state

    def _checkpoint(self, improved: bool) -> None:
        if not self.dist.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.folder / "last.safetensors", self.model)
        save_weights(self.folder / "loss.safetensors", self.loss)
        if improved:
            save_weights(self.folder / "best.safetensors", self.model)
        meta = save_optimizer(self.folder / "optimizer.safetensors", self.optimizer)
        write_json(self.folder / "state.json", {**self.state, "optimizer": meta, "rng": _rng_state()})

    # -- steps
    def train_step(self, batch: dict[str, Any], generator: torch.Generator, update: bool = True
                   ) -> dict[str, float]:
        """One step: draw MLM masks (unless cached variants came with the batch), forward, the loss,
        backward; ``update`` applies and clears the accumulated gradients. Returns the loss terms."""
        cfg = self.profile.train
        if not self.comparator and self.loss.needs_mlm and "masked_text_states" not in batch:
            masked, labels = mask_tokens(batch["input_ids"].cpu(), self.tokenizer,
                                         self.profile.loss.mlm_probability, generator)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked.to(self.device), labels.to(self.device)
        with autocast(self.device, cfg.amp):
            out = self._forward(self.ddp_model, batch)
            total, terms = (self.model.loss(out, batch) if self.comparator
                            else self.loss(**_loss_inputs(out, batch)))
        (total / cfg.grad_accumulation).backward()
        if update:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return terms

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.profile.train
        self.ddp_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs) if cfg.lr_schedule == "cosine" else cfg.lr
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.fold.index * 101 + epoch)
        sums: dict[str, float] = {}
        n = 0
        steps = list(batches(self.fold.train, cfg.batch_size, generator, self.dist))
        for i, idx in enumerate(tqdm(steps, desc=f"fold {self.fold.index} epoch {epoch}",
                                     leave=False, disable=self.quiet or not self.dist.is_main)):
            update = (i + 1) % cfg.grad_accumulation == 0 or i + 1 == len(steps)
            terms = self.train_step(self.source.batch(idx, self.device, epoch), generator, update)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value * len(idx)
            n += len(idx)
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items()}

    def _forward(self, module: nn.Module, batch: dict[str, Any]):
        return module(batch) if self.comparator else module(**batch)

    @torch.no_grad()
    def predict_columns(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """``margin`` (the log-odds of a bad outcome, :func:`ichpro.calibration.margin`) of the given
        patients with the current weights, and a comparator's auxiliary predictions
        (``Comparator.auxiliary_predictions``)."""
        self.model.eval()
        columns: dict[str, list[torch.Tensor]] = {}
        for idx in batches(indices, self.profile.train.batch_size, None):
            with autocast(self.device, self.profile.train.amp):
                out = self._forward(self.model, self.source.batch(idx, self.device))
            preds = {"margin": margin(out.logits)}
            if self.comparator:
                preds.update(self.model.auxiliary_predictions(out))
            for name, value in preds.items():
                columns.setdefault(name, []).append(value.cpu())
        return {name: torch.cat(values).double().numpy() for name, values in columns.items()}

    def _validate(self) -> dict[str, float]:
        p = IDENTITY.p_bad(self.predict_columns(self.fold.val)["margin"])
        labels = self.source.labels[self.fold.val].numpy()
        eps = 1e-7
        loss = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
        auc = classification_metrics(labels, p)["auc"]
        return {"val_loss": float(loss), "val_auc": float(auc)}

    def calibrate(self) -> PlattScaling:
        """The selected model's recalibration (``TrainConfig.calibration``), fitted on the inner
        validation split and saved to ``calibration.json`` in the fold folder."""
        if self.profile.train.calibration == "none":
            return IDENTITY
        scaling = PlattScaling.fit(self.predict_columns(self.fold.val)["margin"],
                                   self.source.labels[self.fold.val].numpy())
        if self.dist.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / CALIBRATION_FILE, asdict(scaling))
        return scaling

    def fit(self, run_metrics: Path | None) -> pd.DataFrame:
        """Train to the end (or early stop), then predict the test fold with the best checkpoint."""
        cfg = self.profile.train
        epochs = tqdm(range(self.state["epoch"] + 1, cfg.epochs + 1), desc=f"fold {self.fold.index}",
                      leave=False, disable=self.quiet or not self.dist.is_main)
        for epoch in epochs:
            if cfg.patience is not None and self.state["stale"] >= cfg.patience:
                break
            start = time.perf_counter()
            row = {"fold": self.fold.index, "epoch": epoch, **self._train_epoch(epoch), **self._validate()}
            row["seconds"] = round(time.perf_counter() - start, 3)
            score = row["val_auc"] if np.isfinite(row["val_auc"]) else -row["val_loss"]
            improved = score > self.state["best_score"]
            if improved:
                self.state.update(best_epoch=epoch, best_score=score, stale=0)
            else:
                self.state["stale"] += 1
            self.state["epoch"] = epoch
            self.state["history"].append(row)
            self._checkpoint(improved)
            if run_metrics is not None and self.dist.is_main:
                pd.DataFrame([row]).to_csv(run_metrics, mode="a", index=False,
                                           header=not run_metrics.exists())
        if (self.folder / "best.safetensors").is_file():
            load_weights(self.folder / "best.safetensors", self.model)
        scaling = self.calibrate()
        columns = self.predict_columns(self.fold.test)
        m = columns.pop("margin")
        return pd.DataFrame({
            "patient_id": [self.source.patient_ids[i] for i in self.fold.test],
            "fold": self.fold.index, "p_bad": scaling.p_bad(m),
            "label": self.source.labels[self.fold.test].numpy(), "p_bad_uncalibrated": IDENTITY.p_bad(m),
            **columns,
        })


# --------------------------------------------------------------------------- cross-validation


def manifest_checksum(manifest: pd.DataFrame) -> str:
    """Checksum of the patients, labels and reports a run was trained on."""
    text = manifest[["patient_id", "label", "report"]].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_record(profile: Profile, manifest: pd.DataFrame, seed: int) -> dict[str, Any]:
    """What identifies a run: its config (and hash), seed, data checksum, versions and commit."""
    from ichpro.reproduce import versions

    config = asdict(profile)
    data = manifest_checksum(manifest)
    return {"config": config, "seed": seed, "manifest_checksum": data,
            "config_hash": config_hash({"config": config, "seed": seed, "data": data}),
            "versions": versions()["version"].to_dict()}


def cross_validate(profile: Profile, manifest: pd.DataFrame, run_dir: Path, *, seed: int = 0,
                   resume: bool = False, quiet: bool = False, cache_dir: Path | None = None,
                   text: TextBackbone | None = None) -> pd.DataFrame:
    """Patient-level stratified k-fold CV of ``profile`` on ``manifest``; returns the OOF predictions.

    ``resume`` continues an interrupted run in ``run_dir``: finished folds are reused, the current
    fold restarts after its last saved epoch. A run folder of another config is refused. The
    trained model's number of trainable parameters goes to ``parameters.json``. A clinical baseline
    (``ModelConfig.comparator`` in :data:`ichpro.clinical.CLINICAL_BASELINES`) is fitted on the
    same test folds with scikit-learn instead.
    """
    run_dir = Path(run_dir)
    device = resolve_device(profile.train.device)
    dist_info = init_distributed(device)
    record = run_record(profile, manifest, seed)
    if dist_info.is_main:
        _claim_run_dir(run_dir, record, resume)
        ensure_pretrained(profile, quiet)
    barrier(dist_info)
    folds = split_folds(manifest["label"].to_numpy(), profile.train.n_folds,
                        profile.train.val_fraction, seed)
    if profile.model.comparator in CLINICAL_BASELINES:
        return _clinical_baseline(profile.model.comparator, manifest, folds, run_dir, seed, dist_info)
    if text is None:
        text = load_text_backbone(profile.model.text_encoder, reports=manifest["report"].tolist(),
                                  save_dir=run_dir / "text_encoder", seed=seed)
    source = BatchSource(manifest, profile, text, cache_dir)
    metrics_path = run_dir / "metrics.csv"
    predictions, prepared = [], False
    for fold in tqdm(folds, desc="folds", disable=quiet or not dist_info.is_main):
        done = run_dir / f"fold{fold.index}" / "predictions.csv"
        if done.is_file():
            predictions.append(pd.read_csv(done))
            continue
        trainer = FoldTrainer(profile, source, text, fold, run_dir / f"fold{fold.index}", device,
                              seed, dist_info, quiet)
        if not prepared:  # once per run: every fold's model has the same inputs and size
            _prepare_inputs(source, trainer, text, device, seed, quiet)
            prepared = True
            if dist_info.is_main:
                write_json(run_dir / "parameters.json", {"trainable": count_parameters(trainer.model)
                                                         + count_parameters(trainer.loss)})
        if "clinical" in getattr(trainer.model, "INPUTS", ()):
            source.standardize_clinical(fold.train)
        if resume:
            trainer.resume()
        fold_predictions = trainer.fit(metrics_path)
        if dist_info.is_main:
            _atomic_write(done, lambda p, df=fold_predictions: df.to_csv(p, index=False))
        barrier(dist_info)
        predictions.append(fold_predictions)
    oof = pd.concat(predictions, ignore_index=True)
    if dist_info.is_main:
        _atomic_write(run_dir / OOF_FILE, lambda p: oof.to_csv(p, index=False))
    return oof


def _prepare_inputs(source: BatchSource, trainer: FoldTrainer, text: TextBackbone, device: torch.device,
                    seed: int, quiet: bool) -> None:
    """Encode every patient with the frozen encoders, or load what a comparator reads."""
    profile = source.profile
    if not trainer.comparator:
        if profile.model.freeze_vision or profile.model.freeze_text:
            source.precompute(trainer.model, device, profile.train.batch_size, seed, quiet)
        return
    inputs = trainer.model.INPUTS
    if {"vision_features", "text_states"} & set(inputs):
        if not (profile.model.freeze_vision and profile.model.freeze_text):
            raise IchproError(f"comparator {profile.model.comparator!r} reads the frozen encoders' outputs: "
                              "train it with frozen encoders (--freeze-encoders)")
        encoders = fresh_model(encoders_profile(profile), text, seed).to(device)
        source.precompute(encoders, device, profile.train.batch_size, seed, quiet)
    source.load_comparator_inputs(inputs, quiet)


def _clinical_baseline(name: str, manifest: pd.DataFrame, folds: list[Fold], run_dir: Path, seed: int,
                       dist_info: Distributed) -> pd.DataFrame:
    """Out-of-fold P(bad) of a clinical baseline on the same test folds as every trained model."""
    fold_of = np.empty(len(manifest), dtype=int)
    for fold in folds:
        fold_of[fold.test] = fold.index
    p_bad, n_parameters = clinical_baseline_cv(name, manifest, fold_of, seed)
    oof = pd.DataFrame({"patient_id": manifest["patient_id"].astype(str).to_numpy(), "fold": fold_of,
                        "p_bad": p_bad, "label": manifest["label"].to_numpy()})
    oof = oof.sort_values(["fold", "patient_id"], kind="stable").reset_index(drop=True)
    if dist_info.is_main:
        write_json(run_dir / "parameters.json", {"trainable": n_parameters})
        _atomic_write(run_dir / OOF_FILE, lambda p: oof.to_csv(p, index=False))
    return oof


def _claim_run_dir(run_dir: Path, record: dict, resume: bool) -> None:
    """Write run.json, or check that a resumed run folder belongs to the same config."""
    path = run_dir / "run.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("config_hash") != record["config_hash"]:
            raise IchproError(f"{run_dir} holds a run of another config (hash {existing.get('config_hash')} "
                              f"!= {record['config_hash']}); use a new --out folder")
        if not resume:
            raise IchproError(f"{run_dir} already holds this run; pass --resume to continue it or "
                              "use a new --out folder")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
