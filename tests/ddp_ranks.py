"""Run under torchrun: one epoch of a smoke cross-validation whose two folds train as one batched fit
with the full VTMF loss; instead of predicting, each rank writes every member's learned weights (the
objective's included) to ``<out>/rank<r>.safetensors`` for a test to compare."""

import sys
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file

from ichpro.config import get_profile
from ichpro.manifest import load_manifest
from ichpro.train import BatchedFit, cross_validate


def main(manifest_path: str, out: str) -> None:
    profile = get_profile("smoke", pretrain=None)  # a seeded random frozen encoder: no pretraining
    profile = replace(profile, train=replace(profile.train, batch_size=4, epochs=1, n_folds=2))
    manifest = load_manifest(Path(manifest_path)).iloc[:48].reset_index(drop=True)

    def write_learned_weights(fit: BatchedFit) -> None:
        stack = fit.stack
        learned = {f"member{j}.{name}": p[j].detach().clone()
                   for name, p in zip(stack.trainable, stack.params, strict=True) for j in range(stack.size)}
        save_file(learned, str(Path(out) / f"rank{fit.distributed.rank}.safetensors"))
        raise SystemExit(0)

    BatchedFit._finish = write_learned_weights
    cross_validate(profile, manifest, Path(out) / "run", quiet=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
