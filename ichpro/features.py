"""Frozen encoders' outputs, computed once and cached on disk.

When an encoder is frozen its output for a patient never changes, so a fit only needs it once. The
outputs are cached as safetensors under ``<cache>/features/`` (:func:`cached`, which the preprocessed
CTs of :func:`ichpro.data.make_dataset` use too) with a key (sha256) over everything that
determines them:

* vision feature maps: the encoder's weights (their bytes), the preprocessing config and the
  contents of every CT file;
* text token states: the encoder's weights and the token ids (reports, tokenizer, ``max_tokens``);
* masked-report states for the MLM term: the same, plus the masked token ids of every variant.

A frozen text encoder gives the same states for the same masked report, so instead of re-encoding
freshly masked reports at every step the MLM term uses a fixed set of ``mlm_variants`` masked
copies of each report (drawn once from the run's seed), one variant per epoch in turn.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FEATURES_VERSION = 2


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    return named_tensors_digest(module.state_dict())


def named_tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors, in their order: names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def files_digest(paths: Iterable[str | Path]) -> str:
    """sha256 of the contents of files (a folder counts as its files, in name order)."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:
            if file.is_file():
                with open(file, "rb") as handle:
                    digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of tensors' bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def cache_key(kind: str, **parts: object) -> str:
    """Key of one cache entry: a hash of its kind, the module version and its parts."""
    text = json.dumps({"kind": kind, "version": FEATURES_VERSION, **parts}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def cached(folder: Path | None, key: str, compute: Callable[[], dict[str, torch.Tensor]]
           ) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors stored under ``key`` in ``folder``, computed (and stored) when absent or damaged;
    also says whether it was a hit.

    Each entry holds the sha256 of its tensors, checked on every read: a truncated or altered entry
    is recomputed, with one line saying so. Writes go to a temporary file of the writing process and
    are renamed into place, so processes sharing a cache never see a partial entry.
    """
    if folder is None:
        return compute(), False
    path = Path(folder) / f"{key}.safetensors"
    if path.is_file():
        tensors = _verified(path)
        if tensors is not None:
            return tensors, True
        print(f"cache entry {path} is damaged (truncated or altered): recomputing it", file=sys.stderr)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"sha256": _tensors_checksum(tensors)})
    tmp.replace(path)
    return tensors, False


def _tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    return named_tensors_digest({name: tensors[name] for name in sorted(tensors)})


def _verified(path: Path) -> dict[str, torch.Tensor] | None:
    """The entry's tensors if they match the checksum stored with them, else None."""
    try:
        with safe_open(str(path), "pt") as handle:
            expected = (handle.metadata() or {}).get("sha256")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
    return tensors if expected == _tensors_checksum(tensors) else None
