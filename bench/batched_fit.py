"""Folds and seeds trained as one batched fit vs one at a time, and where a training step stands
against this machine's roofline (targets: a frozen-feature row >= 4x, from-scratch networks >= 2x).

    .venv/bin/python bench/batched_fit.py [--profile cpu] [--patients 160] [--seeds 5] [--epochs 2]
                                          [--members 25] [--networks NAME ...] [--repeats 3] [--threads N]
                                          [--quick]

1. **Roofline.** This machine's fp32 and bf16 throughput, forward + backward, FLOPs counted by
   ``torch.utils.flop_counter.FlopCounterMode``: a 1024 x 1024 matmul, and the frozen-feature
   model's two kinds of convolution at the cpu profile's sizes: the fusion tail's Conv3d (64 -> 64,
   3 x 3 x 3 on the 4 x 8 x 8 grid, batch 16; two thirds of a step's FLOPs) and a header Conv1d.
2. **The frozen-feature step** (``--profile``, cpu: fusion, header, loss heads, full VTMF + age/GCS loss,
   backward, Adam; batch 16, random features of the cached outputs' shapes): one member alone vs
   each member of a stack of ``--members`` (the folds x seeds of a row), fp32 and under bf16
   autocast; FLOPs per member step, GFLOP/s and the share of the fp32 matmul's.
3. **A frozen-feature row**: ``--seeds`` seeds x 5 folds of the profile's ICHPro cross-validated
   with ``cross_validate_seeds`` as one batched fit vs each fold as its own fit (``batched=False``,
   the same engine), ``--epochs`` epochs on a cohort of ``--patients``, warm feature cache; whole
   wall time, each side run once (the seeds' text encodings and caches are the same on both sides).
4. **From-scratch image networks** (Table 4's CNNs, trained on the CT): one training step of five
   members (a row's folds) batched by ``vmap`` vs one member at a time, per network.

Vision weights are random (same shapes and cost as the pretrained ones: see ``common.py``).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import common
import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.flop_counter import FlopCounterMode

from ichpro.batches import stack_batches
from ichpro.ensemble import MemberStack, StackedAdam, trainable_state
from ichpro.models import build_model
from ichpro.models.comparators import build_comparator
from ichpro.train import cross_validate_seeds, prepare_vision_weights

ROW_TARGET, SCRATCH_TARGET = 4.0, 2.0
FROM_SCRATCH = ["slice2d", "image+gcs", "small3dcnn", "densenet", "densenet+bin_gcs+bin_age",
                "densenet+ord_gcs+bin_age", "quantification_single", "quantification", "vdafm"]


def flops_and_seconds(step, repeats: int) -> tuple[float, float]:
    """FLOPs of one call of ``step`` (forward + backward as it runs) and its median seconds."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops(), common.interleaved({"step": step}, repeats, warmup=1)["step"]


def roofline(repeats: int) -> dict[str, dict[str, float]]:
    """GFLOP/s of a matmul, the tail's Conv3d and a header Conv1d, fp32 and bf16 (autocast)."""
    torch.manual_seed(0)
    shapes = {"matmul 1024 x 1024": None,
              "Conv3d 64->64, 3x3x3, 16 x 4x8x8": (torch.nn.Conv3d(64, 64, 3, padding=1), (16, 64, 4, 8, 8)),
              "Conv1d 64->64, k3, 16 x 64": (torch.nn.Conv1d(64, 64, 3, padding=1), (16, 64, 64))}
    result: dict[str, dict[str, float]] = {}
    for name, spec in shapes.items():
        for precision in ("fp32", "bf16"):
            if spec is None:
                a, b = (torch.randn(1024, 1024, requires_grad=True) for _ in range(2))
                fn = lambda a=a, b=b: (a @ b).sum()  # noqa: E731
            else:
                layer, shape = spec
                x = torch.randn(shape, requires_grad=True)
                fn = lambda layer=layer, x=x: layer(x).sum()  # noqa: E731

            def step(fn=fn, precision=precision) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = fn()
                loss.backward()

            flops, seconds = flops_and_seconds(step, repeats)
            result.setdefault(name, {})[precision] = flops / seconds / 1e9
    return result


def frozen_steps(name: str, members: int, repeats: int, matmul: float) -> list[list[object]]:
    """The profile's frozen-feature step: alone (one member) and stacked (per member), with its share
    of ``matmul`` GFLOP/s."""
    profile = common.bench_profile(name)
    cfg = replace(profile.model, text_layers=None)  # the states are cached: one layer stands for the encoder
    batch, tokens, report_words = profile.train.batch_size, 48, 257  # the cpu cohort's mean and vocabulary
    bert = common.cached_text_stand_in(profile)
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        model = build_model(cfg, copy.deepcopy(bert) if seed == 0 else models[0].text.bert, profile.loss)
        model.mlm.restrict_vocabulary(torch.arange(1000, 1000 + report_words))
        models.append(model.train())
    with torch.no_grad():
        grid = models[0].vision(torch.zeros(1, 1, *profile.preprocess.spatial_size)).shape[1:]
    batches = [common.frozen_batch(grid, bert.config.hidden_size, batch, tokens, report_words, seed)
               for seed in range(members)]
    stacks = {m: MemberStack(models[0], [trainable_state(model) for model in models[:m]]).train()
              for m in (1, members)}
    optimizers = {m: StackedAdam(stack.params, m, profile.train.lr) for m, stack in stacks.items()}

    def step(m: int, precision: str):
        stacked = stack_batches(batches[:m])

        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = stacks[m]([(list(range(m)), stacked)])
            loss.backward()
            optimizers[m].step(list(range(m)))
        return run

    with FlopCounterMode(display=False) as counter:  # a member's work is the same alone or stacked
        step(1, "fp32")()
    flops, rows = counter.get_total_flops(), []
    for precision in ("fp32", "bf16"):
        for m in (1, members):
            seconds = common.interleaved({"step": step(m, precision)}, repeats, warmup=1)["step"] / m
            gflops = flops / seconds / 1e9
            rows.append([precision, m, flops / 1e9, seconds * 1000, gflops, f"{gflops / matmul:.0%}"])
    return rows


def row_fit(name: str, patients: int, seeds: int, epochs: int) -> list[list[object]]:
    """A frozen-feature row of the profile cross-validated batched and one fold at a time."""
    profile = common.derive(common.bench_profile(name), train={"epochs": epochs})
    manifest = common.tiny_cohort(profile.cohort, patients)
    prepare_vision_weights(profile, quiet=True)
    seconds = {}
    with common.scratch("batched-") as tmp:
        options = {"quiet": True, "cache_dir": tmp / "cache"}
        cross_validate_seeds(profile, manifest, {s: tmp / "warm" / str(s) for s in range(seeds)}, **options)
        for batched in (True, False):
            runs = {s: tmp / f"{batched}" / str(s) for s in range(seeds)}
            seconds[batched] = common.timed(lambda runs=runs, batched=batched: cross_validate_seeds(
                profile, manifest, runs, batched=batched, **options))
    ratio = seconds[False] / seconds[True]
    folds = profile.train.n_folds
    return [[f"{seeds} seeds x {folds} folds, {epochs} epochs, {patients} patients", seconds[False],
             seconds[True], ratio, f">= {ROW_TARGET:g}", common.verdict(ratio >= ROW_TARGET)]]


def scratch_step(name: str, repeats: int, members: int = 5) -> list[object]:
    """One training step of a from-scratch network: ``members`` models batched vs one at a time."""
    cfg = common.bench_profile("cpu").model
    torch.manual_seed(0)
    nets = [build_comparator(name, cfg, 384).train() for _ in range(members)]
    params, buffers = stack_module_state(nets)
    template = copy.deepcopy(nets[0])
    g = torch.Generator().manual_seed(0)
    batch = {"ct": torch.rand(members, 16, 1, *cfg.comparator_input, generator=g),
             "labels": torch.randint(0, 2, (members, 16), generator=g),
             "gcs": torch.randint(3, 16, (members, 16), generator=g).float(),
             "age": 30 + 60 * torch.rand(members, 16, generator=g),
             "volume_ml": 50 * torch.rand(members, 16, generator=g),
             "clinical": torch.randn(members, 16, 5, generator=g).double(),
             "image_text_ids": torch.randint(1, 20, (members, 16, 24), generator=g),
             "image_text_mask": torch.ones(members, 16, 24, dtype=torch.long)}
    losses = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)).loss, randomness="different")

    def batched() -> None:
        losses(params, buffers, batch).sum().backward()

    def one_by_one() -> None:
        for j, net in enumerate(nets):
            net({k: v[j] for k, v in batch.items()}).loss.backward()

    times = common.interleaved({"batched": batched, "alone": one_by_one}, repeats, warmup=1)
    ratio = times["alone"] / times["batched"]
    return [name, times["alone"] / members * 1000, times["batched"] / members * 1000, ratio,
            f">= {SCRATCH_TARGET:g}", common.verdict(ratio >= SCRATCH_TARGET)]


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu"])
    parser.add_argument("--patients", type=int, default=160)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--members", type=int, default=25, help="members of the stacked step (folds x seeds)")
    parser.add_argument("--networks", nargs="+", default=FROM_SCRATCH, choices=FROM_SCRATCH)
    parser.add_argument("--repeats", type=int, default=3)
    args = common.parse(parser, argv, quick={"profile": "smoke", "patients": 20, "seeds": 2, "epochs": 1,
                                             "members": 2, "networks": ["small3dcnn"], "repeats": 1})
    peaks = roofline(args.repeats)
    common.print_table("Roofline: GFLOP/s, forward + backward", ["operation", "fp32", "bf16"],
                       [[name, r["fp32"], r["bf16"]] for name, r in peaks.items()])
    common.print_table(
        f"Frozen-feature training step ({args.profile} profile): one member alone vs each member of a stack",
        ["precision", "members", "GFLOP per member step", "ms per member step", "GFLOP/s",
         "share of the fp32 matmul's GFLOP/s"],
        frozen_steps(args.profile, args.members, args.repeats, peaks["matmul 1024 x 1024"]["fp32"]),
        ["FLOPs from FlopCounterMode over one member's whole step (forward, backward), the same alone or "
         "stacked; bf16 is autocast."])
    common.print_table(
        "A frozen-feature row: every fold of every seed as one batched fit vs each fold alone",
        ["row", "one at a time (s)", "batched (s)", "one at a time / batched", "target", "result"],
        row_fit(args.profile, args.patients, args.seeds, args.epochs),
        ["Whole cross_validate_seeds calls, warm feature cache: training, validation, checkpoints, "
         "calibration and test predictions of every fold, and each seed's text-encoder loading."])
    common.print_table(
        "From-scratch image networks: a training step of 5 members (a row's folds), batched vs alone",
        ["network", "alone (ms per member)", "batched (ms per member)", "alone / batched", "target",
         "result"],
        [scratch_step(name, args.repeats) for name in args.networks],
        ["Batched: vmap over the stacked members, so each convolution becomes a grouped convolution."])


if __name__ == "__main__":
    main()
