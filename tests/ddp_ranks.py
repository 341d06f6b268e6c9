"""Run under torchrun: one epoch of one smoke fold with the full VTMF loss, then each rank writes its
learned weights (the objective's included) to ``<out>/rank<r>.safetensors`` for a test to compare."""

import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ichpro.batches import BatchSource, batches
from ichpro.config import get_profile
from ichpro.manifest import load_manifest
from ichpro.runtime import init_distributed
from ichpro.text import load_text_backbone
from ichpro.train import FoldTrainer, encoders_profile, fresh_model, split_folds


def main(manifest_path: str, out: str) -> None:
    profile = get_profile("smoke", pretrain=None)  # a seeded random frozen encoder: no pretraining
    profile = replace(profile, train=replace(profile.train, batch_size=4))
    device = torch.device("cpu")
    distributed = init_distributed(device)
    manifest = load_manifest(Path(manifest_path)).iloc[:48].reset_index(drop=True)
    text = load_text_backbone("tiny", reports=manifest["report"].tolist(), seed=0)
    source = BatchSource(manifest, profile, text, None)
    fold = split_folds(manifest["label"].to_numpy(), 2, 0.2, 0)[0]
    trainer = FoldTrainer(profile, source, text, fold, Path(out) / "fold0", device, 0, distributed, True)
    source.prepare(trainer.model, lambda: fresh_model(encoders_profile(profile), text, 0), device, 0,
                   quiet=True)
    trainer.fit_training_patients()
    trainer.ddp_model.train()
    generator = torch.Generator().manual_seed(distributed.rank)
    for idx in batches(fold.train, profile.train.batch_size, generator, distributed):
        trainer.train_step(source.batch(idx, device, 1, generator))
    learned = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(learned, str(Path(out) / f"rank{distributed.rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
