"""Forward and forward+backward time of ICHPro with the full VTMF loss, per profile, on this CPU.

    .venv/bin/python bench/model_step.py [--profiles smoke cpu paper] [--batch 4] [--repeats 3]

The paper profile uses a randomly initialised BERT-base of Bio_ClinicalBERT's size (its weights
are not downloaded) and the paper's 32 x 512 x 512 input with batch 1 unless --paper-batch says
otherwise. Prints one row per profile: parameters, median seconds, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from ichpro.config import get_profile
from ichpro.losses import CompositeLoss
from ichpro.models import build_model
from ichpro.reports import Report, render
from ichpro.text import load_text_backbone, mask_tokens, tokenize

REPORT = render(Report(70, "Male", 90, 14, 9, "Conservative treatment", "Left basal ganglia hemorrhage",
                       35.0))


def text_model(profile_name: str):
    """The profile's text encoder, or a random BERT-base for the paper profile."""
    if profile_name == "paper":
        return BertModel(BertConfig(vocab_size=28996)), None
    backbone = load_text_backbone(get_profile(profile_name).model.text_encoder, reports=[REPORT] * 20)
    return backbone.model, backbone.tokenizer


def measure(profile_name: str, batch_size: int, repeats: int) -> dict:
    profile = get_profile(profile_name)
    torch.manual_seed(0)
    bert, tokenizer = text_model(profile_name)
    model = build_model(profile.model, bert, profile.loss)
    loss_fn = CompositeLoss.from_config(profile.loss)
    if tokenizer is None:
        ids = torch.randint(1000, 28000, (batch_size, 60))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["mlm_input_ids"] = ids.clone()
        batch["mlm_labels"] = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)
    else:
        batch = tokenize(tokenizer, [REPORT] * batch_size)
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(batch["input_ids"], tokenizer,
                                                                  generator=torch.Generator().manual_seed(0))
    batch["ct"] = torch.rand(batch_size, 1, *profile.preprocess.spatial_size)
    labels = torch.arange(batch_size) % 2

    def step(backward: bool) -> float:
        start = time.perf_counter()
        out = model(**batch)
        if backward:
            total, _ = loss_fn(labels=labels, logits=out.logits, vision_embedding=out.vision_embedding,
                               text_embedding=out.text_embedding, mlm_logits=out.mlm_logits,
                               mlm_labels=out.mlm_labels)
            total.backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(True)  # warm-up
    with torch.no_grad():
        forward = statistics.median(step(False) for _ in range(repeats))
    both = statistics.median(step(True) for _ in range(repeats))
    size = "x".join(map(str, profile.preprocess.spatial_size))
    return {"profile": profile_name, "batch": batch_size, "input": size,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "forward_s": round(forward, 3), "forward_backward_s": round(both, 3),
            "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profiles", nargs="+", default=["smoke", "cpu", "paper"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--paper-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| profile | batch | input | params (M) | forward (s) | forward+backward (s) | peak RSS (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.profiles:
        row = measure(name, args.paper_batch if name == "paper" else args.batch,
                      1 if name == "paper" else args.repeats)
        print("| " + " | ".join(str(v) for v in row.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
