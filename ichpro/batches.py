"""Model batches: the per-patient tensors a model declares it reads (:mod:`ichpro.models.contract`),
made once per run (frozen-encoder outputs through the disk cache of :mod:`ichpro.features`), and the
index batches of each training epoch, each rank taking its share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Resize
from tqdm.auto import tqdm

from ichpro.clinical import clinical_fields
from ichpro.config import Profile
from ichpro.data import make_dataset
from ichpro.errors import IchproError
from ichpro.features import cache_key, cached, files_digest, tensors_digest, weights_digest
from ichpro.image_report import image_report, measure_ct_file, template_tokens
from ichpro.manifest import haematoma_volumes
from ichpro.models import ICHPro, PrognosisModel
from ichpro.models.comparators import clinical_tensor
from ichpro.runtime import SINGLE_PROCESS, Distributed
from ichpro.text import IGNORE_INDEX, TextBackbone, mask_tokens, tokenize

#: batch keys made by encoding every patient once with the profile's frozen encoders
ENCODED = ("vision_features", "text_states", "masked_text_states")
#: batch keys only training reads: the masked reports of the MLM term
MASKED_REPORTS = ("masked_text_states", "mlm_input_ids")


class BatchSource:
    """Model batches for lists of patient indices, holding what a model declares it reads.

    :meth:`prepare` makes the per-patient tensors of a model's ``inputs`` and ``targets``
    (:class:`~ichpro.models.contract.PrognosisModel`): the report's tokens are always there; a
    frozen vision encoder's feature maps, a frozen text encoder's token states and masked-report
    variants (for MLM) come from encoding every patient once (see :mod:`ichpro.features` for the
    disk cache); CTs at the model's ``ct_size``, clinical fields, auxiliary targets and VDAFM's
    template text are held in memory; CTs at the preprocessed size are read per batch.

    ========================  ======================================================================
    key                       content
    ========================  ======================================================================
    ``input_ids``             (N, L) the report's tokens, with ``attention_mask``
    ``ct``                    (N, 1, D, H, W) preprocessed CT (area-resized to ``ct_size`` if given)
    ``vision_features``       (N, C, d, h, w) the frozen vision encoder's output
    ``text_states``           (N, L, H) the frozen text encoder's states of the report
    ``masked_text_states``    (variants, N, L, H) of masked reports, with ``mlm_labels``
    ``mlm_input_ids``         drawn at every training step, with ``mlm_labels``
    ``mlm_decoded``           (training, batched fits) how many positions the MLM head decodes
    ``vision_dropout_draw``   (training) a uniform draw per patient (``training_draws``)
    ``clinical``              (N, F) raw clinical fields (:func:`~ichpro.models.comparators.clinical_tensor`)
    ``gcs``, ``age``          (N,) raw values (from the column or the report)
    ``volume_ml``             (N,) the true haematoma volume (:func:`ichpro.manifest.haematoma_volumes`)
    ``image_text_ids``        (N, L) VDAFM's template text measured on each CT file, with ``image_text_mask``
    ========================  ======================================================================
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
        self.keys: set[str] = set()
        self.draws: tuple[str, ...] = ()  # the model's training_draws

    def cts(self, idx: Iterable[int]) -> torch.Tensor:
        """The preprocessed CTs (B, 1, D, H, W) of the patients ``idx``, from the dataset (and its cache)."""
        return torch.stack([self.dataset[i]["ct"] for i in idx])

    @torch.no_grad()
    def prepare(self, model: PrognosisModel, encoders: Callable[[], ICHPro], device: torch.device,
                seed: int, *, with_targets: bool = True, quiet: bool = False) -> None:
        """Make every tensor ``model`` reads available; without ``with_targets`` (prediction) neither
        its ``targets`` nor the masked reports (:data:`MASKED_REPORTS`).

        ``encoders`` builds the model whose frozen encoders encode the patients, called only when
        ``model`` reads their outputs (:data:`ENCODED`).
        """
        inputs = set(model.inputs)
        self.keys = inputs | set(model.targets) if with_targets else inputs - set(MASKED_REPORTS)
        self.draws = tuple(model.training_draws)
        if self.keys & set(ENCODED):
            cfg = self.profile.model
            if ("vision_features" in self.keys and not cfg.freeze_vision) or (
                    {"text_states", "masked_text_states"} & self.keys and not cfg.freeze_text):
                raise IchproError(f"this model reads the frozen encoders' outputs ({', '.join(ENCODED)}): "
                                  "train it with frozen encoders (--freeze-encoders)")
            self._encode(encoders(), device, seed, quiet)
        n = len(self.labels)
        if "ct" in self.keys and model.ct_size is not None:
            resize = Resize(model.ct_size, mode="area")  # a step after the preprocessing, on the tensor

            def load_cts() -> dict[str, torch.Tensor]:
                return {"ct": torch.stack([resize(self.dataset[i]["ct"]).as_tensor() for i in
                                           tqdm(range(n), desc="loading CTs", disable=quiet, leave=False)])}

            key = cache_key("comparator-ct", preprocess=asdict(self.profile.preprocess), size=model.ct_size,
                            cts=files_digest(self.ct_paths))
            self._store(self.features, key, load_cts)
        if "image_text_ids" in self.keys:
            def template_text() -> dict[str, torch.Tensor]:
                texts = [image_report(measure_ct_file(path))
                         for path in tqdm(self.ct_paths, desc="measuring CTs", disable=quiet, leave=False)]
                ids, mask = template_tokens(texts)
                return {"image_text_ids": ids, "image_text_mask": mask}

            key = cache_key("image-text", cts=files_digest(self.ct_paths))
            self._store(self.features, key, template_text)
        if "clinical" in self.keys:
            self.features["clinical"] = clinical_tensor(self.manifest)
        fields = clinical_fields(self.manifest) if {"gcs", "age"} & self.keys else None
        for name in ("gcs", "age"):
            if name in self.keys:
                missing = fields[name].isna()
                if missing.any():
                    raise IchproError(f"{int(missing.sum())} patient(s) have no {name} (column or report), "
                                      f"e.g. {self.manifest['patient_id'][missing].iloc[0]}: this model "
                                      f"predicts {name} and needs it for every patient")
                self.features[name] = torch.tensor(fields[name].to_numpy(), dtype=torch.float32)
        if "volume_ml" in self.keys:
            self.features["volume_ml"] = torch.tensor(haematoma_volumes(self.manifest), dtype=torch.float32)

    def _encode(self, model: ICHPro, device: torch.device, seed: int, quiet: bool) -> None:
        """Encode every patient once with ``model``'s frozen encoders (from the disk cache if there)."""
        n, batch_size = len(self.labels), self.profile.train.batch_size
        model = model.to(device).eval()
        chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]

        def encode(name: str, fn) -> torch.Tensor:
            return torch.cat([fn(idx).cpu() for idx in tqdm(chunks, desc=f"encoding {name}",
                                                            disable=quiet, leave=False)])

        def feature_maps(idx: list[int]) -> torch.Tensor:
            return model.vision(self.cts(idx).to(device))

        if "vision_features" in self.keys:
            key = cache_key("vision", weights=weights_digest(model.vision),
                            preprocess=asdict(self.profile.preprocess), cts=files_digest(self.ct_paths))
            self._store(self.features, key, lambda: {"vision_features": encode("CTs", feature_maps)})
        text_weights = weights_digest(model.text)
        ids, mask = self.tokens["input_ids"], self.tokens["attention_mask"]

        def states(input_ids: torch.Tensor) -> torch.Tensor:
            return encode("reports", lambda idx: model.text(input_ids[idx].to(device), mask[idx].to(device)))

        if "text_states" in self.keys:
            key = cache_key("text", weights=text_weights, tokens=tensors_digest([ids, mask]))
            self._store(self.features, key, lambda: {"text_states": states(ids)})
        if "masked_text_states" in self.keys:
            generator = torch.Generator().manual_seed(seed)
            variants = [mask_tokens(ids, self.tokenizer, self.profile.loss.mlm_probability, generator)
                        for _ in range(self.profile.loss.mlm_variants)]
            masked_ids = torch.stack([v[0] for v in variants])
            self.masked["mlm_labels"] = torch.stack([v[1] for v in variants])
            key = cache_key("masked", weights=text_weights, tokens=tensors_digest([masked_ids, mask]))
            self._store(self.masked, key, lambda: {"masked_text_states": torch.stack(
                [states(variant) for variant in masked_ids])})

    def training_patients(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """What ``PrognosisModel.fit_training_patients`` reads of the patients ``idx``, and
        ``cohort_words``: every token of every report of the cohort (the MLM head's decoded words)."""
        held = dict(self.tokens)
        if "clinical" in self.features:
            held["clinical"] = self.features["clinical"]
        words = self.tokens["input_ids"][self.tokens["attention_mask"].bool()]
        return {**{k: v[idx] for k, v in held.items()}, "cohort_words": words}

    def _store(self, into: dict[str, torch.Tensor], key: str, compute) -> None:
        folder = None if self.cache_dir is None else self.cache_dir / "features"
        tensors, self.cache_hits[key.split("-")[0]] = cached(folder, key, compute)
        into.update(tensors)

    def batch(self, idx: list[int], device: torch.device, epoch: int | None = None,
              generator: torch.Generator | None = None) -> dict[str, Any]:
        """The batch of patients ``idx`` (indices into the manifest).

        A training batch (``epoch`` from 1) also holds the labels, the masked report (the cached
        variant of the epoch, or one drawn with ``generator``) and the model's ``training_draws``
        (drawn with ``generator``). Without ``epoch`` the batch holds the inputs only, as at prediction.
        """
        batch = {k: v[idx].to(device) for k, v in {**self.tokens, **self.features}.items()}
        if "ct" in self.keys and "ct" not in batch:
            batch["ct"] = self.cts(idx).to(device)
        if epoch is None:
            return batch
        if self.masked:
            variant = (epoch - 1) % self.profile.loss.mlm_variants
            batch.update({k: v[variant, idx].to(device) for k, v in self.masked.items()})
        if "mlm_input_ids" in self.keys:
            masked, labels = mask_tokens(batch["input_ids"].cpu(), self.tokenizer,
                                         self.profile.loss.mlm_probability, generator)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked.to(device), labels.to(device)
        for key in self.draws:
            batch[key] = torch.rand(len(idx), generator=generator).to(device)
        batch["labels"] = self.labels[idx].to(device)
        return batch


def stack_batches(members: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """The batches of several members of a batched fit (:mod:`ichpro.ensemble`), of one shape,
    stacked along a new leading member dimension. With masked reports, ``mlm_decoded`` (shared by the
    members) is the most masked positions any member's batch has: the MLM head decodes that many
    positions of each member (:class:`~ichpro.models.heads.MLMHead`)."""
    stacked: dict[str, Any] = {key: torch.stack([batch[key] for batch in members]) for key in members[0]}
    if "mlm_labels" in stacked:
        stacked["mlm_decoded"] = int((stacked["mlm_labels"] != IGNORE_INDEX).flatten(1).sum(1).max())
    return stacked


def batches(indices: np.ndarray, batch_size: int, generator: torch.Generator | None,
            distributed: Distributed = SINGLE_PROCESS) -> Iterator[list[int]]:
    """Index batches: shuffled when a generator is given, each rank taking its share."""
    if generator is not None:
        indices = indices[torch.randperm(len(indices), generator=generator).numpy()]
    global_batch = batch_size * distributed.world
    for start in range(0, len(indices), global_batch):
        chunk = indices[start:start + global_batch]
        share = chunk[distributed.rank::distributed.world]
        if len(share):
            yield share.tolist()


def collate_items(items: Sequence[Mapping[str, Any]], tokenizer: Any, max_tokens: int = 128,
                  mlm_probability: float = 0.0, generator: torch.Generator | None = None
                  ) -> dict[str, Any]:
    """Stack dataset items (:func:`ichpro.data.make_dataset`) into an end-to-end model batch: ct,
    input_ids, attention_mask, labels, patient_id, and with ``mlm_probability`` > 0 the masked report
    (mlm_input_ids, mlm_labels). The notebooks use it to step through a model from the CT."""
    batch: dict[str, Any] = tokenize(tokenizer, [item["report"] for item in items], max_tokens)
    batch["ct"] = torch.stack([torch.as_tensor(item["ct"]) for item in items])
    batch["labels"] = torch.tensor([int(item["label"]) for item in items])
    batch["patient_id"] = [item["patient_id"] for item in items]
    if mlm_probability > 0:
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
            batch["input_ids"], tokenizer, mlm_probability, generator)
    return batch
