"""Batched fits: several members (folds and seeds) trained as one stacked model, each as if alone."""

import copy
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from sample_reports import REPORTS

from ichpro.batches import BatchSource, stack_batches
from ichpro.config import get_profile
from ichpro.ensemble import MemberStack, StackedAdam, draws_global_randomness, trainable_state
from ichpro.models import build_model
from ichpro.models.comparators import build_comparator
from ichpro.text import IGNORE_INDEX, load_text_backbone, mask_tokens, tokenize
from ichpro.train import BatchedFit, cross_validate_seeds, prepare_vision_weights

SMOKE = get_profile("smoke")


@pytest.fixture(scope="module")
def tiny():
    return load_text_backbone("tiny", reports=REPORTS * 5, seed=0)


def encoded_batch(model, backbone, seed):
    """A training batch of the four reports with the frozen encoders' outputs, as a fit reads it."""
    g = torch.Generator().manual_seed(seed)
    batch = tokenize(backbone.tokenizer, REPORTS)
    masked, batch["mlm_labels"] = mask_tokens(batch["input_ids"], backbone.tokenizer, generator=g)
    with torch.no_grad():
        batch["vision_features"] = model.vision(torch.rand(4, 1, 16, 64, 64, generator=g))
        batch["text_states"] = model.text(batch["input_ids"], batch["attention_mask"])
        batch["masked_text_states"] = model.text(masked, batch["attention_mask"])
    batch["labels"] = torch.tensor([0, 1, 1, 0]) if seed % 2 else torch.tensor([1, 1, 0, 0])
    batch["vision_dropout_draw"] = torch.rand(4, generator=g)
    return batch


def test_stacked_adam_steps_each_member_as_torch_adam_steps_it_alone():
    torch.manual_seed(0)
    start = torch.randn(3, 5, 4)
    stacked = torch.nn.Parameter(start.clone())
    stacked_adam = StackedAdam([stacked], members=3, lr=1e-2, weight_decay=0.1)
    alone = [torch.nn.Parameter(start[j].clone()) for j in range(3)]
    adams = [torch.optim.Adam([p], lr=1e-2, weight_decay=0.1) for p in alone]
    schedule = [[0, 1, 2], [0, 2], [0, 1, 2], [2]]  # member 1 sits out two steps (an early stop)
    for members in schedule:
        grads = torch.randn(3, 5, 4)
        stacked.grad = grads.clone()
        stacked_adam.step(members)
        for j in members:
            alone[j].grad = grads[j].clone()
            adams[j].step()
        assert stacked.grad.abs().sum() == 0 or stacked.grad[members].abs().sum() == 0  # cleared
    for j in range(3):
        torch.testing.assert_close(stacked.data[j], alone[j].data, rtol=1e-6, atol=1e-7)
    assert stacked_adam.steps.tolist() == [3, 2, 4]


def test_a_stacked_member_computes_the_loss_gradients_and_statistics_of_the_model_alone(tiny):
    """Float32 sums in another order: the loss equal to 1e-5 relative; gradients to 1e-3 relative or
    1e-4 absolute, since a gradient that is zero in exact arithmetic (a bias before BatchNorm) comes
    out as rounding noise of the loss's scale (about 1e-5 here) in both computations."""
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(build_model(replace(SMOKE.model, vision_dropout=0.5), copy.deepcopy(tiny.model),
                                  SMOKE.loss).train())
    batches = [encoded_batch(models[0], tiny, seed) for seed in (0, 1, 2)]
    stack = MemberStack(copy.deepcopy(models[0]), [trainable_state(m) for m in models]).train()
    loss, terms = stack([([0, 1, 2], stack_batches(batches))])
    loss.backward()
    for j, (model, batch) in enumerate(zip(models, batches, strict=True)):
        out = model(batch)
        out.loss.backward()
        assert terms[j]["total"].item() == pytest.approx(out.loss.item(), rel=1e-5)
        member = stack.member_state(j, persistent_only=False)
        for name, p in model.named_parameters():
            if p.requires_grad:
                grad = stack.params[stack.trainable.index(name)].grad[j]
                torch.testing.assert_close(grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
        for name, buffer in model.named_buffers():
            if name in member:  # BatchNorm's running statistics, updated per member
                torch.testing.assert_close(member[name], buffer, rtol=1e-5, atol=1e-6, msg=name)


def test_stacked_batches_decode_the_most_masked_positions_of_any_member():
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, :2], labels[1, 3] = 7, 9
    other = torch.full((2, 6), IGNORE_INDEX)
    other[0, 1] = 5
    stacked = stack_batches([{"mlm_labels": labels}, {"mlm_labels": other}])
    assert stacked["mlm_labels"].shape == (2, 2, 6) and stacked["mlm_decoded"] == 3


def test_the_mlm_head_over_a_larger_decoded_set_predicts_only_its_own_words(tiny):
    torch.manual_seed(0)
    model = build_model(SMOKE.model, copy.deepcopy(tiny.model), SMOKE.loss)
    batch = encoded_batch(model, tiny, 0)
    own = batch["input_ids"][batch["attention_mask"].bool()]
    model.mlm.restrict_vocabulary(own)
    alone = model(batch)
    every_word = torch.arange(model.mlm.bias.numel())  # a superset, as a fit's union of its members' words
    model.mlm.restrict_vocabulary(own, decoded=every_word)
    wider = model(batch)
    assert wider.mlm_logits.shape[1] == len(every_word) > alone.mlm_logits.shape[1]
    assert wider.terms["mlm"].item() == pytest.approx(alone.terms["mlm"].item(), rel=1e-5)
    padded = model({**batch, "mlm_decoded": alone.mlm_logits.shape[0] + 5})  # as a stacked member
    assert padded.terms["mlm"].item() == pytest.approx(alone.terms["mlm"].item(), rel=1e-5)
    assert (padded.mlm_labels[-5:] == IGNORE_INDEX).all()


def test_which_models_train_batched(tiny):
    cpu = get_profile("cpu").model
    frozen = build_model(SMOKE.model, copy.deepcopy(tiny.model), SMOKE.loss)
    end_to_end = build_model(replace(SMOKE.model, freeze_text=False), copy.deepcopy(tiny.model), SMOKE.loss)
    assert not frozen.encodes_each_step() and not draws_global_randomness(frozen)  # BERT's dropout is off
    assert end_to_end.encodes_each_step()
    assert build_comparator("small3dcnn", cpu).encodes_each_step()  # a CNN on the CT: one fold at a time
    assert draws_global_randomness(build_comparator("concat_late", cpu, 384))  # its head's dropout


@pytest.fixture(scope="module")
def minilm_profile():
    """The smoke sizes with the pretrained MiniLM: frozen encoders that do not depend on the seed, so
    the folds of several seeds train as one fit (as on the cpu profile)."""
    profile = get_profile("smoke")
    profile = replace(profile, model=replace(profile.model, text_encoder="minilm", text_layers=2),
                      train=replace(profile.train, epochs=2, n_folds=2, lr=1e-3))
    prepare_vision_weights(profile, quiet=True)
    return profile


def test_a_batched_fold_predicts_as_the_same_fold_trained_alone(minilm_profile, manifest, tmp_path,
                                                                monkeypatch):
    """In float64, to 1e-7 before calibration. In float32 the members' sums run in another order
    and differ by about 1e-6 (previous test), and Adam, which divides each gradient by its running
    scale, moves a weight whose gradient is zero in exact arithmetic (a bias before BatchNorm) by up
    to the learning rate per step wherever rounding leaves it nonzero: two float32 runs drift apart by
    about the learning rate times the steps, whoever computes them. Float64 makes that noise 1e-9
    times smaller, far below Adam's epsilon, and so shows that a member computes exactly what it
    computes alone."""
    sizes = []
    original_init, original_batch = BatchedFit.__init__, BatchSource.batch

    def float64_fit(self, profile, members, template, states, *args):
        sizes.append(len(members))
        states = [{k: v.double() if v.dtype == torch.float32 else v for k, v in s.items()} for s in states]
        original_init(self, profile, members, template.double(), states, *args)

    def float64_batch(self, *args, **kwargs):
        batch = original_batch(self, *args, **kwargs)
        return {k: v.double() if v.dtype == torch.float32 else v for k, v in batch.items()}

    monkeypatch.setattr(BatchedFit, "__init__", float64_fit)
    monkeypatch.setattr(BatchSource, "batch", float64_batch)
    cache = tmp_path / "cache"
    batched = cross_validate_seeds(minilm_profile, manifest, {0: tmp_path / "s0", 1: tmp_path / "s1"},
                                   quiet=True, cache_dir=cache)
    assert sizes == [4]  # two seeds x two folds in one fit
    shutil.copytree(tmp_path / "s1", tmp_path / "alone")
    shutil.rmtree(tmp_path / "alone" / "fold0")
    alone = cross_validate_seeds(minilm_profile, manifest, {1: tmp_path / "alone"}, quiet=True,
                                 cache_dir=cache, resume=True)[1]
    assert sizes == [4, 1]  # the other fold was finished: fold 0 of seed 1 trained alone
    together, by_itself = (oof.query("fold == 0").set_index("patient_id") for oof in (batched[1], alone))
    assert list(together.index) == list(by_itself.index)
    # the margins agree to about 1e-9; Platt's two parameters, fit on the few validation patients of
    # a smoke fold, amplify that about a hundredfold (measured 2e-9 -> 3e-7)
    np.testing.assert_allclose(together["p_bad_uncalibrated"], by_itself["p_bad_uncalibrated"], rtol=1e-7)
    np.testing.assert_allclose(together["p_bad"], by_itself["p_bad"], rtol=1e-5)
    metrics = [pd.read_csv(tmp_path / run / "metrics.csv").query("fold == 0") for run in ("s1", "alone")]
    for column in ("train_ce", "train_imima", "train_sdm", "train_mlm", "val_loss", "val_auc"):
        np.testing.assert_allclose(metrics[0][column], metrics[1][column], rtol=1e-6)
