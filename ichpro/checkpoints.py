"""Checkpoint I/O: atomic writes, weights and optimizer state as safetensors plus JSON, RNG state.

Nothing is ever unpickled. A module may declare ``frozen_prefixes``, the state-dict prefixes of
frozen encoders that are rebuilt from the config and seed instead of being saved.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ichpro.errors import IchproError
from ichpro.files import atomic_write


def _skipped(module: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(module, "frozen_prefixes", ()))


def save_weights(path: Path, module: nn.Module) -> None:
    """Save a module's state dict as safetensors, atomically; frozen encoders and tied copies are left out."""
    skip = _skipped(module)
    state, seen = {}, set()
    for key, value in module.state_dict().items():
        if key.startswith(skip) or (value.numel() and value.data_ptr() in seen):
            continue
        seen.add(value.data_ptr())
        state[key] = value
    save_tensors(path, state)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save named tensors as safetensors, atomically (copied to the CPU, contiguous)."""
    state = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
    atomic_write(path, lambda p: save_file(state, str(p)))


def load_weights(path: Path, module: nn.Module) -> None:
    """Load weights saved by :func:`save_weights` into a module built from the same config."""
    missing, unexpected = module.load_state_dict(read_safetensors(path), strict=False)
    skip = _skipped(module)
    absent = [k for k in missing if not k.startswith(skip) and not k.endswith("word_embeddings.weight")]
    if absent or unexpected:
        raise IchproError(f"{path} does not fit this model: missing {absent[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an IchproError naming the file when it is missing or damaged."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise IchproError(f"{path} cannot be read ({err}): it is missing, truncated or damaged; "
                          "retrain the run (or the fold whose folder holds it, with --resume)") from None


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer tensors to safetensors; returns the JSON-able rest (steps, hyper-parameters)."""
    state = optimizer.state_dict()
    tensors = {f"{idx}.{name}": value.detach().cpu().contiguous()
               for idx, entry in state["state"].items() for name, value in entry.items()
               if torch.is_tensor(value)}
    atomic_write(path, lambda p: save_file(tensors, str(p)))
    return {"param_groups": state["param_groups"]}


def load_optimizer(path: Path, meta: dict, optimizer: torch.optim.Optimizer) -> None:
    """Restore an optimizer saved by :func:`save_optimizer`."""
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in read_safetensors(path).items():
        idx, name = key.split(".", 1)
        entries.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": meta["param_groups"]})


def rng_state() -> str:
    """torch's global RNG state as text (for a JSON state file)."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    """Restore the state :func:`rng_state` returned."""
    raw = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
