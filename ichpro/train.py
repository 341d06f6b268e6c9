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
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

from ichpro.batches import BatchSource, batches
from ichpro.calibration import IDENTITY, PlattScaling, margin
from ichpro.checkpoints import (
    load_optimizer,
    load_weights,
    rng_state,
    save_optimizer,
    save_weights,
    set_rng_state,
)
from ichpro.clinical import CLINICAL_BASELINES, clinical_baseline_cv
from ichpro.config import Profile
from ichpro.data import config_hash, make_folds
from ichpro.errors import IchproError
from ichpro.files import atomic_write, file_digest, read_json, write_json
from ichpro.metrics import classification_metrics
from ichpro.models import PrognosisModel, build_model
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


class FoldTrainer:
    """Fits one fold with checkpoints every epoch; resumes from the fold folder if asked.

    The model (ICHPro or a comparator) computes its own loss (:mod:`ichpro.models.contract`); with
    several processes DistributedDataParallel wraps it whole, objective included.
    """

    def __init__(self, profile: Profile, source: BatchSource, text: TextBackbone, fold: Fold,
                 folder: Path, device: torch.device, seed: int, distributed: Distributed, quiet: bool):
        self.profile, self.source, self.fold, self.folder = profile, source, fold, folder
        self.device, self.seed, self.distributed, self.quiet = device, seed, distributed, quiet
        self.model = fresh_model(profile, text, seed).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=profile.train.lr,
                                          weight_decay=profile.train.weight_decay)
        self.ddp_model: nn.Module = self.model
        if distributed.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.state: dict[str, Any] = {"epoch": 0, "best_score": -np.inf, "stale": 0, "files": {},
                                      "metrics": []}

    def fit_training_patients(self) -> None:
        """Let the model fit what it takes from the fold's training patients (after ``source.prepare``)."""
        self.model.fit_training_patients(
            {k: v.to(self.device) for k, v in self.source.training_patients(self.fold.train).items()})

    # -- persistence
    def resume(self) -> None:
        """Continue from the last committed epoch in the fold folder, if any: the files its
        ``state.json`` names, checked against the hashes it holds."""
        state_path = self.folder / STATE_FILE
        if not state_path.is_file():
            return
        state = read_json(state_path, "the fold's training state")
        for role, name in state["files"].items():
            if file_digest(self.folder / name) != state["sha256"][role]:
                raise IchproError(f"{self.folder / name} is damaged or missing (its hash is not the one "
                                  f"{STATE_FILE} recorded): delete the folder {self.folder} and run again "
                                  "with --resume to retrain this fold")
        load_weights(self.folder / state["files"]["last"], self.model)
        load_optimizer(self.folder / state["files"]["optimizer"], state.pop("optimizer"), self.optimizer)
        set_rng_state(state.pop("rng"))
        self.state = state

    def _checkpoint(self, epoch: int, improved: bool, row: dict[str, Any], run_metrics: Path | None) -> None:
        """Commit the epoch as one unit: its files under new names, then ``state.json`` naming and
        hashing them (the commit), then the run's ``metrics.csv`` rebuilt from the committed rows."""
        files = {"last": f"last-{epoch}.safetensors", "optimizer": f"optimizer-{epoch}.safetensors",
                 "best": f"best-{epoch}.safetensors" if improved else self.state["files"].get("best")}
        files = {role: name for role, name in files.items() if name is not None}
        self.state.update(epoch=epoch, files=files, metrics=[*self.state["metrics"], row])
        if not self.distributed.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.folder / files["last"], self.model)
        if improved:
            save_weights(self.folder / files["best"], self.model)
        meta = save_optimizer(self.folder / files["optimizer"], self.optimizer)
        self.state["sha256"] = {role: file_digest(self.folder / name) for role, name in files.items()}
        write_json(self.folder / STATE_FILE, {**self.state, "optimizer": meta, "rng": rng_state()})
        for path in self.folder.glob("*-*.safetensors"):  # the files of earlier epochs
            if path.name not in files.values():
                path.unlink()
        self.write_metrics(run_metrics)

    def write_metrics(self, run_metrics: Path | None) -> None:
        """The run's metrics: the other folds' rows as they are, this fold's committed rows."""
        if run_metrics is None or not self.distributed.is_main:
            return
        rows = pd.DataFrame(self.state["metrics"])
        if run_metrics.is_file():
            others = pd.read_csv(run_metrics)
            rows = pd.concat([others[others["fold"] != self.fold.index], rows], ignore_index=True)
        atomic_write(run_metrics, lambda p: rows.to_csv(p, index=False))

    # -- steps
    def train_step(self, batch: dict[str, Any], update: bool = True) -> dict[str, float]:
        """One step: forward with the loss, backward; ``update`` applies and clears the accumulated
        gradients. Returns the loss terms."""
        cfg = self.profile.train
        with autocast(self.device, cfg.amp):
            out = self.ddp_model(batch)
        if out.loss is None:
            raise IchproError(f"the training batch lacks what the model's objective reads: labels and "
                              f"{', '.join(self.model.targets) or 'no more'}")
        (out.loss / cfg.grad_accumulation).backward()
        if update:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out.terms

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.profile.train
        self.ddp_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, epoch, cfg.epochs) if cfg.lr_schedule == "cosine" else cfg.lr
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.fold.index * 101 + epoch)
        sums: dict[str, float] = {}
        n = 0
        steps = list(batches(self.fold.train, cfg.batch_size, generator, self.distributed))
        for i, idx in enumerate(tqdm(steps, desc=f"fold {self.fold.index} epoch {epoch}",
                                     leave=False, disable=self.quiet or not self.distributed.is_main)):
            update = (i + 1) % cfg.grad_accumulation == 0 or i + 1 == len(steps)
            terms = self.train_step(self.source.batch(idx, self.device, epoch, generator), update)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value * len(idx)
            n += len(idx)
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items()}

    @torch.no_grad()
    def predict_columns(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """``margin`` (the log-odds of a bad outcome, :func:`ichpro.calibration.margin`) of the given
        patients with the current weights, and the model's auxiliary predictions."""
        self.model.eval()
        columns: dict[str, list[torch.Tensor]] = {}
        for idx in batches(indices, self.profile.train.batch_size, None):
            with autocast(self.device, self.profile.train.amp):
                out = self.model(self.source.batch(idx, self.device))
            declared = {name: out.auxiliary[name] for name in self.model.auxiliary_tasks}
            for name, value in {"margin": margin(out.logits), **declared}.items():
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
        if self.distributed.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / CALIBRATION_FILE, asdict(scaling))
        return scaling

    def fit(self, run_metrics: Path | None) -> pd.DataFrame:
        """Train to the end (or early stop), then predict the test fold with the best checkpoint."""
        cfg = self.profile.train
        if self.state["metrics"]:  # a resumed fold: its committed rows, whatever the last kill left
            self.write_metrics(run_metrics)
        epochs = tqdm(range(self.state["epoch"] + 1, cfg.epochs + 1), desc=f"fold {self.fold.index}",
                      leave=False, disable=self.quiet or not self.distributed.is_main)
        for epoch in epochs:
            if cfg.patience is not None and self.state["stale"] >= cfg.patience:
                break
            start = time.perf_counter()
            row = {"fold": self.fold.index, "epoch": epoch, **self._train_epoch(epoch), **self._validate()}
            row["seconds"] = round(time.perf_counter() - start, 3)
            score = row["val_auc"] if np.isfinite(row["val_auc"]) else -row["val_loss"]
            # each rank validates with its own BatchNorm statistics: rank 0's score decides for all,
            # so every rank keeps the same epoch and stops at the same one
            score = self.distributed.from_main(score, self.device)
            improved = score > self.state["best_score"]
            if improved:
                self.state.update(best_score=score, stale=0)
            else:
                self.state["stale"] += 1
            self._checkpoint(epoch, improved, row, run_metrics)
        best = self.state["files"].get("best")
        self.distributed.barrier()  # rank 0 has written the best epoch's file before any rank reads it
        if best is not None:
            load_weights(self.folder / best, self.model)
            if self.distributed.is_main:
                atomic_write(self.folder / BEST_FILE, lambda p: shutil.copyfile(self.folder / best, p))
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
                   resume: bool = False, quiet: bool = False, cache_dir: Path | None = None,
                   text: TextBackbone | None = None) -> pd.DataFrame:
    """Patient-level stratified k-fold CV of ``profile`` on ``manifest``; returns the OOF predictions.

    ``resume`` continues an interrupted run in ``run_dir``: finished folds are reused, the current
    fold restarts after its last saved epoch. A run folder of another config is refused. The
    trained model's number of trainable parameters goes to ``parameters.json``. A clinical baseline
    (``ModelConfig.comparator`` in :data:`ichpro.clinical.CLINICAL_BASELINES`) is fitted on the
    same test folds with scikit-learn instead. A pretrained vision encoder the model reads must
    exist already (:func:`prepare_vision_weights`).
    """
    run_dir = Path(run_dir)
    device = resolve_device(profile.train.device)
    distributed = init_distributed(device)
    folds = split_folds(manifest["label"].to_numpy(), profile.train.n_folds,
                        profile.train.val_fraction, seed)
    record = run_record(profile, manifest, seed)
    if distributed.is_main:
        _claim_run_dir(run_dir, record, resume)
    distributed.barrier()
    if profile.model.comparator in CLINICAL_BASELINES:
        return _clinical_baseline(profile.model.comparator, manifest, folds, run_dir, seed, distributed)
    if text is None:
        text = load_text_backbone(profile.model.text_encoder, reports=manifest["report"].tolist(),
                                  save_dir=run_dir / "text_encoder", seed=seed)
    source = BatchSource(manifest, profile, text, cache_dir)
    metrics_path = run_dir / "metrics.csv"
    predictions, prepared = [], False
    for fold in tqdm(folds, desc="folds", disable=quiet or not distributed.is_main):
        done = run_dir / f"fold{fold.index}" / "predictions.csv"
        if done.is_file():
            predictions.append(read_predictions(done))
            continue
        trainer = FoldTrainer(profile, source, text, fold, run_dir / f"fold{fold.index}", device,
                              seed, distributed, quiet)
        if not prepared:  # once per run: every fold's model has the same inputs and size
            source.prepare(trainer.model, lambda: fresh_model(encoders_profile(profile), text, seed),
                           device, seed, quiet=quiet)
            prepared = True
            if distributed.is_main:
                write_json(run_dir / "parameters.json", {"trainable": count_parameters(trainer.model)})
        trainer.fit_training_patients()
        if resume:
            trainer.resume()
        fold_predictions = trainer.fit(metrics_path)
        if distributed.is_main:
            atomic_write(done, lambda p, df=fold_predictions: df.to_csv(p, index=False))
        distributed.barrier()
        predictions.append(fold_predictions)
    oof = pd.concat(predictions, ignore_index=True)
    if distributed.is_main:
        atomic_write(run_dir / OOF_FILE, lambda p: oof.to_csv(p, index=False))
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
