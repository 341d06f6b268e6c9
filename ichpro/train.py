"""Training engine: fit one fold, patient-level cross-validation, checkpoints and resume (batches:
:mod:`ichpro.batches`; device, AMP and DDP: :mod:`ichpro.runtime`).

A run folder holds everything a run needs to be resumed and audited::

    run.json                 config, seed, config hash, manifest checksum, versions, git commit
    metrics.csv              one row per (fold, epoch): every loss term, validation loss and AUC
    oof_predictions.csv      patient_id, fold, p_bad, label, p_bad_uncalibrated, and the model's
                             auxiliary predictions: every patient once
    fold{k}/last-{e}.safetensors, fold{k}/optimizer-{e}.safetensors    (epoch e, the last committed)
    fold{k}/best-{e}.safetensors                                       (the best epoch so far)
    fold{k}/state.json        the commit of an epoch: names and hashes the files above, holds the
                              fold's metrics rows, the optimizer's settings and the RNG state
    fold{k}/best.safetensors  the selected weights                     (fold finished)
    fold{k}/calibration.json  the selected model's Platt scaling (TrainConfig.calibration "platt")
    fold{k}/predictions.csv                                            (fold finished)

``p_bad`` in the predictions is the recalibrated P(bad outcome) (:mod:`ichpro.calibration`),
``p_bad_uncalibrated`` the model's own softmax.

Each fold re-initialises the model, selects its checkpoint on an inner validation split of its
training patients (never on the test fold) and predicts its test fold with that checkpoint.
Checkpoints are written atomically (temporary file, then rename) as safetensors plus JSON; nothing
is ever unpickled. An epoch becomes visible as one unit: its files are written under new names, then
``state.json`` (the commit) names and hashes them, then the files of earlier epochs are deleted and
``metrics.csv`` is rebuilt from the committed rows; a kill at any moment resumes from the last
commit, and a damaged checkpoint is named (its hash differs) instead of being loaded.

With frozen encoders (the smoke and cpu profiles) every patient is encoded once and the folds train
only the fusion, header and loss-specific parts on those features.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

from ichpro.batches import BatchSource, batches, stack_batches
from ichpro.calibration import IDENTITY, PlattScaling, margin
from ichpro.checkpoints import read_safetensors, rng_state, save_tensors, set_rng_state
from ichpro.clinical import CLINICAL_BASELINES, clinical_baseline_cv
from ichpro.config import Profile
from ichpro.data import config_hash, make_folds
from ichpro.ensemble import MemberStack, StackedAdam, draws_global_randomness, trainable_state
from ichpro.errors import IchproError
from ichpro.features import named_tensors_digest
from ichpro.files import atomic_write, file_digest, read_json, write_json
from ichpro.metrics import classification_metrics
from ichpro.models import ModelOutput, PrognosisModel, build_model
from ichpro.models.comparators import (
    build_comparator,
    count_parameters,
)
from ichpro.pretrain import ensure_pretrained, with_vision_weights
from ichpro.provenance import versions
from ichpro.runtime import Distributed, autocast, cosine_lr, init_distributed, resolve_device
from ichpro.text import TextBackbone, load_text_backbone

OOF_FILE = "oof_predictions.csv"  # a run's out-of-fold predictions: every patient once
BEST_FILE = "best.safetensors"  # a finished fold's selected weights
CALIBRATION_FILE = "calibration.json"  # a fold's PlattScaling, beside its best.safetensors
STATE_FILE = "state.json"  # a fold's last committed epoch
PREDICTIONS_FILE = "predictions.csv"  # a finished fold's test-fold predictions
PENDING_FILE = "predictions-pending.csv"  # written for every member of a fit before any is renamed


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


def encoders_profile(profile: Profile) -> Profile:
    """The profile's ICHPro model: where a comparator that reads the frozen encoders' outputs gets them."""
    return replace(profile, model=replace(profile.model, comparator=None))


def fresh_model(profile: Profile, text: TextBackbone, seed: int) -> PrognosisModel:
    """The model every fold starts from, seeded: ICHPro with its own copy of the text encoder and
    its objective, or the profile's comparator (``ModelConfig.comparator``).

    Frozen encoders are not checkpointed, so prediction rebuilds them through this same function.
    The vision weights are resolved, not made: :func:`prepare_vision_weights` makes them first.
    """
    if profile.model.comparator is not None:
        torch.manual_seed(seed)
        return build_comparator(profile.model.comparator, profile.model, text.hidden_size)
    if profile.model.modality != "text":
        profile = with_vision_weights(profile)
    torch.manual_seed(seed)
    return build_model(profile.model, copy.deepcopy(text.model), profile.loss)


def uses_pretrained_vision(profile: Profile) -> bool:
    """Whether the model ``profile`` trains reads the profile's pretrained vision encoder: ICHPro with
    images, or a comparator that reads its frozen ``vision_features``."""
    model = profile.model
    if profile.pretrain is None or model.vision_weights is not None or model.comparator in CLINICAL_BASELINES:
        return False
    if model.comparator is None:
        return model.modality != "text"
    return "vision_features" in build_comparator(model.comparator, model, text_hidden=1).inputs  # any width


def prepare_vision_weights(profile: Profile, quiet: bool = False) -> None:
    """Pretrain the vision encoder (once, into the cache) if the row ``profile`` trains reads it.

    Callers do this before :func:`cross_validate`, once for all the rows they train: clinical
    baselines and image networks trained from scratch never pretrain.
    """
    if uses_pretrained_vision(profile):
        ensure_pretrained(profile, quiet)


def fresh_state() -> dict[str, Any]:
    """A fold's training state before its first epoch (what ``state.json`` commits after each)."""
    return {"epoch": 0, "best_score": -np.inf, "stale": 0, "files": {}, "metrics": []}


@dataclass
class Member:
    """One model of a fit: fold ``fold`` of the cross-validation with ``seed``, kept in ``folder``."""

    seed: int
    fold: Fold
    folder: Path
    source: BatchSource
    state: dict[str, Any] = field(default_factory=fresh_state)

    @property
    def run_dir(self) -> Path:
        return self.folder.parent

    def generator(self, epoch: int) -> torch.Generator:
        """The fold's own random stream of an epoch: batch order, masked reports, training draws."""
        return torch.Generator().manual_seed(self.seed * 7919 + self.fold.index * 101 + epoch)

    def stopped(self, patience: int | None) -> bool:
        return patience is not None and self.state["stale"] >= patience


class BatchedFit:
    """Fits several folds, of one seed or several, as one stacked model (:mod:`ichpro.ensemble`).

    Each member keeps what it would have alone: its training patients, batch order and random draws
    (:meth:`Member.generator`), inner validation split, best-epoch selection, Platt scaling,
    checkpoints, metrics rows and predictions. A member that stops early (``patience``) sits out the
    later epochs. A step stacks the members' batches (members whose batches differ in shape run as
    separate groups of the same forward pass) and one backward trains them all.

    Every epoch is committed as one unit for all members: their files under new names, then each
    member's ``state.json`` (which keeps the previous commit), then the files of earlier epochs are
    deleted and the runs' ``metrics.csv`` rebuilt. A kill between two members' commits is undone on
    resume (the members ahead go back to their previous commit), so a resumed fit replays exactly the
    uninterrupted one. The fit ends the same way: every member's predictions are written as
    ``predictions-pending.csv`` before any is renamed to ``predictions.csv``.
    """

    def __init__(self, profile: Profile, members: list[Member], template: PrognosisModel,
                 states: list[dict[str, torch.Tensor]], device: torch.device, distributed: Distributed,
                 quiet: bool):
        self.profile, self.members, self.device = profile, members, device
        self.distributed, self.quiet = distributed, quiet
        self.stack = MemberStack(template, states).to(device)
        self.model = template
        self.optimizer = StackedAdam(self.stack.params, len(members), profile.train.lr,
                                     profile.train.weight_decay)
        self.randomness = "different" if draws_global_randomness(template) else "error"
        self.ddp_stack: nn.Module = self.stack
        if distributed.world > 1:
            self.ddp_stack = nn.parallel.DistributedDataParallel(
                self.stack, device_ids=[device.index] if device.type == "cuda" else None)

    # -- persistence
    def resume(self) -> None:
        """Continue from the last committed epoch of each member (the files its ``state.json`` names,
        checked against the hashes it holds); members one epoch ahead of the others (a kill between
        two members' commits) go back to their previous commit."""
        for member in self.members:
            path = member.folder / STATE_FILE
            if path.is_file():
                member.state = read_json(path, "the fold's training state")
        patience = self.profile.train.patience
        ahead = max(m.state["epoch"] for m in self.members)
        if any(m.state["epoch"] < ahead and not m.stopped(patience) for m in self.members):
            for member in self.members:
                if member.state["epoch"] == ahead:
                    member.state = member.state["previous"]
        for j, member in enumerate(self.members):
            self._load_state(j, member)
        if self.distributed.is_main:
            self._clean_up(m for m in self.members if m.folder.is_dir())
        self.write_metrics()

    def _load_state(self, j: int, member: Member) -> None:
        state = member.state
        for role, name in state["files"].items():
            if file_digest(member.folder / name) != state["sha256"][role]:
                raise IchproError(f"{member.folder / name} is damaged or missing (its hash is not the one "
                                  f"{STATE_FILE} recorded): delete the folder {member.folder} and run again "
                                  "with --resume to retrain this fold")
        if state["epoch"] == 0:
            return
        self.stack.load_member(j, read_safetensors(member.folder / state["files"]["last"]))
        self.optimizer.load_member(j, self.stack.trainable, read_safetensors(
            member.folder / state["files"]["optimizer"]), state["optimizer"])
        set_rng_state(state["rng"])

    def _commit(self, epoch: int, rows: dict[int, dict[str, Any]], scores: dict[int, float]) -> None:
        """Commit ``epoch`` for the members that trained it, with their metrics rows and selection
        scores: their files, then their ``state.json``, then the clean-up (see the class)."""
        committed = {}
        for j, row in rows.items():
            member = self.members[j]
            previous = {k: v for k, v in member.state.items() if k != "previous"}
            improved = scores[j] > previous["best_score"]
            files = {"last": f"last-{epoch}.safetensors", "optimizer": f"optimizer-{epoch}.safetensors",
                     "best": f"best-{epoch}.safetensors" if improved else previous["files"].get("best")}
            files = {role: name for role, name in files.items() if name is not None}
            member.state = {**previous, "epoch": epoch, "files": files,
                            "metrics": [*previous["metrics"], row],
                            "best_score": max(scores[j], previous["best_score"]),
                            "stale": 0 if improved else previous["stale"] + 1, "previous": previous}
            if not self.distributed.is_main:
                continue
            member.folder.mkdir(parents=True, exist_ok=True)
            weights = self.stack.member_state(j)
            save_tensors(member.folder / files["last"], weights)
            if improved:
                save_tensors(member.folder / files["best"], weights)
            moments, meta = self.optimizer.member_state(j, self.stack.trainable)
            save_tensors(member.folder / files["optimizer"], moments)
            digests = {role: file_digest(member.folder / name) for role, name in files.items()}
            member.state.update(optimizer=meta, rng=rng_state(), sha256=digests)
            committed[j] = member
        for member in committed.values():
            write_json(member.folder / STATE_FILE, member.state)
        self._clean_up(committed.values())
        self.write_metrics()

    def _clean_up(self, members) -> None:
        """Delete the epoch files no commit names any more (earlier epochs, a commit undone)."""
        for member in members:
            for path in member.folder.glob("*-*.safetensors"):
                if path.name not in member.state["files"].values():
                    path.unlink()

    def write_metrics(self) -> None:
        """Each run's ``metrics.csv``: the committed rows of its folds, in fold and epoch order."""
        if not self.distributed.is_main:
            return
        for run_dir in dict.fromkeys(m.run_dir for m in self.members):
            rows = [row for fold in sorted(run_dir.glob("fold*"), key=lambda p: int(p.name[4:]))
                    for row in self._fold_state(fold)["metrics"]]
            if rows:
                frame = pd.DataFrame(rows)
                atomic_write(run_dir / "metrics.csv", lambda p, df=frame: df.to_csv(p, index=False))

    def _fold_state(self, folder: Path) -> dict[str, Any]:
        member = next((m for m in self.members if m.folder == folder), None)
        if member is not None:
            return member.state
        path = folder / STATE_FILE
        return read_json(path, "the fold's training state") if path.is_file() else fresh_state()

    # -- steps
    def _train_epoch(self, epoch: int, active: list[int]) -> dict[int, dict[str, float]]:
        """One epoch of the members ``active``; each one's mean loss terms (``train_<term>``)."""
        cfg = self.profile.train
        self.ddp_stack.train()
        self.optimizer.lr = cosine_lr(cfg.lr, epoch, cfg.epochs) if cfg.lr_schedule == "cosine" else cfg.lr
        generators = {j: self.members[j].generator(epoch) for j in active}
        steps = {j: list(batches(self.members[j].fold.train, cfg.batch_size, generators[j], self.distributed))
                 for j in active}
        sums: dict[int, dict[str, float]] = {j: {} for j in active}
        seen = dict.fromkeys(active, 0)
        n_steps = max(len(s) for s in steps.values())
        for i in tqdm(range(n_steps), desc=f"epoch {epoch}", leave=False,
                      disable=self.quiet or not self.distributed.is_main):
            stepping = [j for j in active if i < len(steps[j])]
            member_batches = {j: self.members[j].source.batch(steps[j][i], self.device, epoch, generators[j])
                              for j in stepping}
            update = [j for j in stepping if (i + 1) % cfg.grad_accumulation == 0 or i + 1 == len(steps[j])]
            values = self.train_step(member_batches, update)
            for j in stepping:
                n = len(steps[j][i])
                for name, value in values[j].items():
                    sums[j][name] = sums[j].get(name, 0.0) + value * n
                seen[j] += n
        return {j: {f"train_{k}": v / max(seen[j], 1) for k, v in sums[j].items()} for j in active}

    def train_step(self, member_batches: dict[int, dict[str, torch.Tensor]], update: list[int]
                   ) -> dict[int, dict[str, float]]:
        """One step of the members with a batch: their forward passes with the loss, one backward; the
        members ``update`` apply and clear their accumulated gradients. Returns their loss terms."""
        cfg = self.profile.train
        with autocast(self.device, cfg.amp):
            loss, terms = self.ddp_stack(_groups(member_batches), randomness=self.randomness)
        values = {j: {name: float(v) for name, v in terms_j.items()} for j, terms_j in terms.items()}
        if not torch.isfinite(loss):
            bad = next((j for j in values if not np.isfinite(list(values[j].values())).all()), min(values))
            raise IchproError(f"fold {self.members[bad].fold.index} (seed {self.members[bad].seed}): the "
                              f"loss is not finite ({values[bad]}); lower the learning rate")
        (loss / cfg.grad_accumulation).backward()
        self.optimizer.step(update)
        return values

    @torch.no_grad()
    def predict_columns(self, indices: dict[int, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
        """``margin`` (the log-odds of a bad outcome, :func:`ichpro.calibration.margin`) of each
        member's patients ``indices[member]`` with its current weights, and the model's auxiliary
        predictions."""
        self.stack.eval()
        chunks = {j: list(batches(idx, self.profile.train.batch_size, None)) for j, idx in indices.items()}
        columns: dict[int, dict[str, list[torch.Tensor]]] = {j: {} for j in indices}
        tasks = self.model.auxiliary_tasks

        def read(out: ModelOutput) -> dict[str, torch.Tensor]:
            return {"margin": margin(out.logits), **{name: out.auxiliary[name] for name in tasks}}

        for i in range(max((len(c) for c in chunks.values()), default=0)):
            member_batches = {j: self.members[j].source.batch(c[i], self.device) for j, c in chunks.items()
                              if i < len(c)}
            for members, batch in _groups(member_batches):
                with autocast(self.device, self.profile.train.amp):
                    out = self.stack.run(members, batch, read, self.randomness)
                for k, j in enumerate(members):
                    for name, value in out.items():
                        columns[j].setdefault(name, []).append(value[k].cpu())
        return {j: {name: torch.cat(values).double().numpy() for name, values in c.items()}
                for j, c in columns.items()}

    def _validate(self, active: list[int]) -> dict[int, dict[str, float]]:
        margins = self.predict_columns({j: self.members[j].fold.val for j in active})
        rows = {}
        for j in active:
            p = IDENTITY.p_bad(margins[j]["margin"])
            labels = self.members[j].source.labels[self.members[j].fold.val].numpy()
            eps = 1e-7
            loss = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
            rows[j] = {"val_loss": float(loss), "val_auc": float(classification_metrics(labels, p)["auc"])}
        return rows

    def fit(self) -> None:
        """Train every member to the end (or its early stop), then predict its test fold with its best
        checkpoint, recalibrated (``predictions.csv`` in its folder)."""
        cfg = self.profile.train
        if all(m.state["epoch"] == 0 for m in self.members):  # the global stream, for dropout layers
            torch.manual_seed(self.members[0].seed * 7919 + self.members[0].fold.index * 101)
        first = min(m.state["epoch"] for m in self.members if not m.stopped(cfg.patience)) + 1 if any(
            not m.stopped(cfg.patience) for m in self.members) else cfg.epochs + 1
        for epoch in tqdm(range(first, cfg.epochs + 1), desc="epochs", leave=False,
                          disable=self.quiet or not self.distributed.is_main):
            active = [j for j, m in enumerate(self.members) if not m.stopped(cfg.patience)]
            if not active:
                break
            start = time.perf_counter()
            trained = self._train_epoch(epoch, active)
            validated = self._validate(active)
            seconds = round((time.perf_counter() - start) / len(active), 3)  # each member's share
            # each rank validates with its own BatchNorm statistics: rank 0's scores decide for all,
            # so every rank keeps the same epochs and stops at the same one
            scores = self.distributed.from_main(
                [r["val_auc"] if np.isfinite(r["val_auc"]) else -r["val_loss"] for r in validated.values()],
                self.device)
            rows = {j: {"fold": self.members[j].fold.index, "epoch": epoch, **trained[j], **validated[j],
                        "seconds": seconds} for j in active}
            self._commit(epoch, rows, dict(zip(active, scores, strict=True)))
        self._finish()

    def _finish(self) -> None:
        """Predict every member's test fold (see the class for how the files are written)."""
        pending = [m.folder / PENDING_FILE for m in self.members]
        if not all(p.is_file() for p in pending):
            self.distributed.barrier()  # rank 0 has written the best epochs' files before any rank reads them
            for j, member in enumerate(self.members):
                best = member.state["files"].get("best")
                if best is not None:
                    self.stack.load_member(j, read_safetensors(member.folder / best))
            scalings = self._calibrate()
            columns = self.predict_columns({j: m.fold.test for j, m in enumerate(self.members)})
            for j, member in enumerate(self.members):
                self._write_pending(member, scalings[j], columns[j])
        self.distributed.barrier()
        if self.distributed.is_main:
            for path in pending:
                publish(path)
        self.distributed.barrier()

    def _calibrate(self) -> list[PlattScaling]:
        """Each selected model's recalibration (``TrainConfig.calibration``), fitted on its inner
        validation split."""
        if self.profile.train.calibration == "none":
            return [IDENTITY] * len(self.members)
        margins = self.predict_columns({j: m.fold.val for j, m in enumerate(self.members)})
        return [PlattScaling.fit(margins[j]["margin"], m.source.labels[m.fold.val].numpy())
                for j, m in enumerate(self.members)]

    def _write_pending(self, member: Member, scaling: PlattScaling, columns: dict[str, np.ndarray]) -> None:
        """A member's selected weights, recalibration and test-fold predictions (as pending)."""
        m = columns.pop("margin")
        frame = pd.DataFrame({
            "patient_id": [member.source.patient_ids[i] for i in member.fold.test],
            "fold": member.fold.index, "p_bad": scaling.p_bad(m),
            "label": member.source.labels[member.fold.test].numpy(), "p_bad_uncalibrated": IDENTITY.p_bad(m),
            **columns,
        })
        if not self.distributed.is_main:
            return
        member.folder.mkdir(parents=True, exist_ok=True)
        best = member.state["files"].get("best")
        if best is not None:
            atomic_write(member.folder / BEST_FILE, lambda p: shutil.copyfile(member.folder / best, p))
        if self.profile.train.calibration != "none":
            write_json(member.folder / CALIBRATION_FILE, asdict(scaling))
        atomic_write(member.folder / PENDING_FILE, lambda p: frame.to_csv(p, index=False))


def publish(pending: Path) -> None:
    """A member's pending predictions become its fold's ``predictions.csv`` (the fold is finished)."""
    os.replace(pending, pending.with_name(PREDICTIONS_FILE))


def _groups(member_batches: dict[int, dict[str, torch.Tensor]]) -> list[tuple[list[int], dict[str, Any]]]:
    """The members' batches stacked, one group per batch shape (the last batch of an epoch may be
    smaller for some members than for others)."""
    by_shape: dict[tuple, list[int]] = {}
    for j, batch in member_batches.items():
        by_shape.setdefault(tuple((k, tuple(v.shape)) for k, v in sorted(batch.items())), []).append(j)
    return [(members, stack_batches([member_batches[j] for j in members])) for members in by_shape.values()]


# --------------------------------------------------------------------------- cross-validation


def read_predictions(path: Path) -> pd.DataFrame:
    """A fold's or a run's predictions CSV, patient ids kept as written (``"000007"`` stays a string)."""
    return pd.read_csv(path, dtype={"patient_id": str})


def manifest_checksum(manifest: pd.DataFrame) -> str:
    """Checksum of the patients, labels and reports a run was trained on."""
    text = manifest[["patient_id", "label", "report"]].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_record(profile: Profile, manifest: pd.DataFrame, seed: int) -> dict[str, Any]:
    """What identifies a run: its config (and hash), seed, data checksum, versions and commit."""
    config = asdict(profile)
    data = manifest_checksum(manifest)
    return {"config": config, "seed": seed, "manifest_checksum": data,
            "config_hash": config_hash({"config": config, "seed": seed, "data": data}),
            "versions": versions()["version"].to_dict()}


def cross_validate(profile: Profile, manifest: pd.DataFrame, run_dir: Path, *, seed: int = 0,
                   resume: bool = False, quiet: bool = False, cache_dir: Path | None = None) -> pd.DataFrame:
    """Patient-level stratified k-fold CV of ``profile`` on ``manifest`` with one seed; returns the
    OOF predictions (:func:`cross_validate_seeds` with one seed)."""
    return cross_validate_seeds(profile, manifest, {seed: run_dir}, resume=resume, quiet=quiet,
                                cache_dir=cache_dir)[seed]


def cross_validate_seeds(profile: Profile, manifest: pd.DataFrame, runs: Mapping[int, Path], *,
                         resume: bool = False, quiet: bool = False, cache_dir: Path | None = None,
                         batched: bool = True) -> dict[int, pd.DataFrame]:
    """Repeated cross-validation: for each ``seed -> run folder`` of ``runs``, patient-level stratified
    k-fold CV of ``profile`` on ``manifest`` with the seed's own folds, inner splits and
    initialisation; returns each seed's OOF predictions.

    The unfinished folds of every seed train together as one :class:`BatchedFit` when the model
    trains on cached encoder outputs (members whose frozen encoders differ, as a seeded random text
    encoder does, form one fit per seed); a model that encodes the CT at every step, or draws global
    randomness (dropout), trains one fold at a time, and so does every fold without ``batched`` (the
    sequential reference of the tests and benchmarks). ``resume`` continues interrupted runs: finished
    folds are reused, the others restart after their last committed epoch. A run folder of another
    config is refused. The trained model's number of trainable parameters goes to
    ``parameters.json``. A clinical baseline (``ModelConfig.comparator`` in
    :data:`ichpro.clinical.CLINICAL_BASELINES`) is fitted on the same test folds with scikit-learn
    instead. A pretrained vision encoder the model reads must exist already
    (:func:`prepare_vision_weights`).
    """
    runs = {seed: Path(run_dir) for seed, run_dir in runs.items()}
    device = resolve_device(profile.train.device)
    distributed = init_distributed(device)
    labels = manifest["label"].to_numpy()
    folds = {seed: split_folds(labels, profile.train.n_folds, profile.train.val_fraction, seed)
             for seed in runs}
    for seed, run_dir in runs.items():
        if distributed.is_main:
            _claim_run_dir(run_dir, run_record(profile, manifest, seed), resume)
    distributed.barrier()
    if profile.model.comparator in CLINICAL_BASELINES:
        return {seed: _clinical_baseline(profile.model.comparator, manifest, folds[seed], run_dir, seed,
                                         distributed) for seed, run_dir in runs.items()}
    # the members by (trained alone, what they share: the seed's model alone, else the frozen encoders)
    fits: dict[tuple[bool, Any], tuple[PrognosisModel, list[Member], list[dict[str, torch.Tensor]]]] = {}
    for seed, run_dir in runs.items():
        todo = [f for f in folds[seed] if not (run_dir / f"fold{f.index}" / PREDICTIONS_FILE).is_file()]
        if not todo:
            continue
        text = load_text_backbone(profile.model.text_encoder, reports=manifest["report"].tolist(),
                                  save_dir=run_dir / "text_encoder", seed=seed)
        model = fresh_model(profile, text, seed).to(device)
        source = BatchSource(manifest, profile, text, cache_dir)
        source.prepare(model, partial(fresh_model, encoders_profile(profile), text, seed), device, seed,
                       quiet=quiet)
        if distributed.is_main:
            write_json(run_dir / "parameters.json", {"trainable": count_parameters(model)})
        alone = not batched or model.encodes_each_step() or draws_global_randomness(model)
        shared = named_tensors_digest({k: v for k, v in model.state_dict().items()  # the frozen encoders
                                       if k.startswith(tuple(model.frozen_prefixes))})
        template, members, states = fits.setdefault((alone, seed if alone else shared), (model, [], []))
        for fold in todo:
            patients = source.training_patients(fold.train)
            model.fit_training_patients({k: v.to(device) for k, v in patients.items()})
            members.append(Member(seed, fold, run_dir / f"fold{fold.index}", source))
            states.append({name: t.clone() for name, t in trainable_state(model).items()})
    for (alone, _), (template, members, states) in fits.items():
        for part in ([[j] for j in range(len(members))] if alone else [range(len(members))]):
            fit = BatchedFit(profile, [members[j] for j in part], template, [states[j] for j in part], device,
                             distributed, quiet)
            if resume:
                fit.resume()
            fit.fit()
    oof = {}
    for seed, run_dir in runs.items():
        oof[seed] = pd.concat([read_predictions(run_dir / f"fold{f.index}" / PREDICTIONS_FILE)
                               for f in folds[seed]], ignore_index=True)
        if distributed.is_main:
            atomic_write(run_dir / OOF_FILE, lambda p, df=oof[seed]: df.to_csv(p, index=False))
    return oof


def _clinical_baseline(name: str, manifest: pd.DataFrame, folds: list[Fold], run_dir: Path, seed: int,
                       distributed: Distributed) -> pd.DataFrame:
    """Out-of-fold P(bad) of a clinical baseline on the same test folds as every trained model."""
    fold_of = np.empty(len(manifest), dtype=int)
    for fold in folds:
        fold_of[fold.test] = fold.index
    p_bad, n_parameters = clinical_baseline_cv(name, manifest, fold_of, seed)
    oof = pd.DataFrame({"patient_id": manifest["patient_id"].astype(str).to_numpy(), "fold": fold_of,
                        "p_bad": p_bad, "label": manifest["label"].to_numpy()})
    oof = oof.sort_values(["fold", "patient_id"], kind="stable").reset_index(drop=True)
    if distributed.is_main:
        write_json(run_dir / "parameters.json", {"trainable": n_parameters})
        atomic_write(run_dir / OOF_FILE, lambda p: oof.to_csv(p, index=False))
    return oof


def _claim_run_dir(run_dir: Path, record: dict, resume: bool) -> None:
    """Write run.json, or check that a resumed run folder belongs to the same config."""
    path = run_dir / "run.json"
    if path.is_file():
        existing = read_json(path, "the run record")
        if existing.get("config_hash") != record["config_hash"]:
            raise IchproError(f"{run_dir} holds a run of another config (hash {existing.get('config_hash')} "
                              f"!= {record['config_hash']}); use a new --out folder")
        if not resume:
            raise IchproError(f"{run_dir} already holds this run; pass --resume to continue it or "
                              "use a new --out folder")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
