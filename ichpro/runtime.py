"""Where and how training runs: the device, mixed precision, the learning-rate schedule, and this
process's place in a ``torchrun`` job."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed

from ichpro.errors import IchproError


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


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote files the others will read)."""
        if self.world > 1:
            torch.distributed.barrier()

    def from_main(self, values: list[float], device: torch.device) -> list[float]:
        """Rank 0's ``values`` on every rank, so that all ranks take one decision from them."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.broadcast(tensor, src=0)
        return tensor.tolist()


SINGLE_PROCESS = Distributed()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return SINGLE_PROCESS
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
