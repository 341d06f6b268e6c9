"""Tests of the loss terms (against hand-computed values) and of the weighted composite loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ichpro.config import LOSS_TERMS, LossConfig
from ichpro.errors import IchproError
from ichpro.losses import (
    CompositeLoss,
    blend_loss,
    ce_loss,
    cmfa_loss,
    cmpm_loss,
    imima_loss,
    info_nce,
    mlm_loss,
    numbers_loss,
    parse_loss_spec,
    sdm_loss,
    supervised_contrastive,
)

EPS = 1e-8
LOG_EPS = math.log(EPS)
EYE2 = torch.eye(2)


def tensor(rows) -> torch.Tensor:
    """A float32 tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)


def row_kl(p_positive: float) -> float:
    """KL term of a 2-way row whose label distribution is one-hot on the class of prob p_positive."""
    p, r = p_positive, 1 - p_positive
    return p * math.log(p) + r * (math.log(r) - LOG_EPS)


def hand_sdm(v: list[list[float]], t: list[list[float]], labels: list[int], tau: float) -> float:
    """SDM in plain python: cosine matrix, row softmax, label distribution, KL with eps, both ways."""

    def unit(x):
        n = math.sqrt(sum(c * c for c in x))
        return [c / n for c in x]

    def one_way(a, b):
        total = 0.0
        for i, ai in enumerate(a):
            scores = [sum(x * y for x, y in zip(unit(ai), unit(bj))) / tau for bj in b]
            z = sum(math.exp(s) for s in scores)
            n_same = sum(labels[i] == y for y in labels)
            for j, s in enumerate(scores):
                p, q = math.exp(s) / z, (labels[i] == labels[j]) / n_same
                total += p * (math.log(p) - math.log(q + EPS))
        return total / len(a)

    return one_way(v, t) + one_way(t, v)


def random_batch(seed: int = 0, b: int = 8, e: int = 16):
    """Random vision/text embeddings (requiring grad) and labels with both classes present."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(b, e, generator=gen).requires_grad_()
    t = torch.randn(b, e, generator=gen).requires_grad_()
    labels = torch.tensor([0, 1] * (b // 2))
    return v, t, labels


# ---------------------------------------------------------------- classification terms


def test_ce_loss_matches_hand_value():
    logits = tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    # sample 0: -log(e^2 / (e^2 + 1)); sample 1: -log(1 / (1 + e))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.e)) / 2
    assert ce_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_blend_is_weighted_sum_of_three_ces():
    gen = torch.Generator().manual_seed(1)
    fused, vision, text = (torch.randn(5, 2, generator=gen) for _ in range(3))
    labels = torch.tensor([0, 1, 1, 0, 1])
    weights = (0.5, 0.3, 0.2)
    expected = sum(w * F.cross_entropy(x, labels) for w, x in zip(weights, (fused, vision, text)))
    assert blend_loss(fused, vision, text, labels, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    assert blend_loss(fused, vision, text, labels).item() == pytest.approx(
        sum(F.cross_entropy(x, labels) for x in (fused, vision, text)).item() / 3, rel=1e-6)


def test_numbers_is_the_mean_squared_error_of_the_standardised_age_and_gcs():
    target = torch.tensor([[80.0, 6.0], [65.0, 10.0]])  # standardised: (1, -1) and (0, 0)
    predicted = torch.tensor([[1.0, 1.0], [0.5, 0.0]])
    assert numbers_loss(predicted, target).item() == pytest.approx((0 + 4 + 0.25 + 0) / 4)


# ---------------------------------------------------------------- contrastive terms


def test_info_nce_hand_value_and_near_zero_for_matched_pairs():
    # cos = identity, tau = 1: each row is -log(e / (e + 1))
    assert info_nce(EYE2, EYE2, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    v, _, _ = random_batch()
    assert info_nce(v, v, 0.01).item() < 1e-3


def test_supcon_hand_value_skips_anchors_without_positive():
    emb = tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])  # anchor 2 has no positive and is skipped
    # anchor 0: sims to 1, 2 = 0, -1 -> log(1 + e^-1); anchor 1: sims to 0, 2 = 0, 0 -> log 2
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert supervised_contrastive(emb, labels, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_supcon_is_zero_with_grad_when_no_anchor_has_a_positive():
    emb = torch.randn(3, 4, requires_grad=True)
    loss = supervised_contrastive(emb, torch.tensor([0, 1, 2]), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_imima_lower_for_matched_than_shuffled_pairs():
    v, _, labels = random_batch(b=12, e=32)
    t = v.detach() + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
    mix = torch.zeros(2)
    matched = imima_loss(v, t, labels, 0.07, mix)
    shuffled = imima_loss(v, t.roll(1, dims=0), labels, 0.07, mix)
    assert matched.item() < shuffled.item()


def test_imima_mixes_inter_and_intra_with_softmax_weights():
    v, t, labels = random_batch()
    inter = (info_nce(v, t, 0.1) + info_nce(t, v, 0.1)) / 2
    intra = (supervised_contrastive(v, labels, 0.1) + supervised_contrastive(t, labels, 0.1)) / 2
    mix = tensor([0.0, math.log(3.0)])  # weights 1/4, 3/4
    expected = 0.25 * inter + 0.75 * intra
    assert imima_loss(v, t, labels, 0.1, mix).item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- distribution matching terms


def test_sdm_closed_form_two_patients():
    # v = t = identity, tau = 1, different labels: q = identity, p rows softmax([1, 0])
    a = math.e / (1 + math.e)
    loss = sdm_loss(EYE2, EYE2, torch.tensor([0, 1]), 1.0)
    assert loss.item() == pytest.approx(2 * row_kl(a), rel=1e-6)


def test_sdm_matches_plain_python_on_three_patients():
    v = [[1.0, 0.0], [0.6, 0.8], [-0.3, 1.0]]
    t = [[0.8, 0.6], [1.0, 0.2], [0.0, -1.0]]
    labels = [0, 0, 1]
    got = sdm_loss(tensor(v), tensor(t), torch.tensor(labels), 0.5).item()
    assert got == pytest.approx(hand_sdm(v, t, labels, 0.5), rel=1e-5)


def test_sdm_is_zero_when_p_equals_q():
    # all patients share a label and an embedding: p and q are both uniform
    same = tensor([[1.0, 2.0]] * 4)
    assert abs(sdm_loss(same, same, torch.zeros(4, dtype=torch.long), 0.07).item()) < 1e-6


def test_sdm_minimal_when_aligned_by_label():
    labels = torch.tensor([0, 0, 1, 1])
    aligned = tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])  # p ~= q at tau = 0.07
    best = sdm_loss(aligned, aligned, labels, 0.07).item()
    assert abs(best) < 1e-6
    assert sdm_loss(aligned, -aligned, labels, 0.07).item() > 10.0  # aligned against the label
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        noisy = aligned + 0.3 * torch.randn(4, 2, generator=gen)
        assert sdm_loss(noisy, aligned, labels, 0.07).item() > best


def test_cmpm_hand_value():
    v = tensor([[1.0, 0.0], [0.0, 2.0]])
    t = tensor([[2.0, 0.0], [0.0, 1.0]])
    # v_i . t^_j = [[1, 0], [0, 2]] and t_i . v^_j = [[2, 0], [0, 1]]: the four rows put
    # softmax([1, 0]) or softmax([2, 0]) on the positive, twice each over the two directions
    a, d = math.e / (1 + math.e), math.e**2 / (1 + math.e**2)
    expected = row_kl(a) + row_kl(d)
    assert cmpm_loss(v, t, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)


def test_cmfa_zero_when_separated_beyond_margin_and_v_equals_t():
    v = tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert cmfa_loss(v, v.clone(), torch.tensor([0, 1]), margin=0.2).item() == pytest.approx(0.0, abs=1e-7)


def test_cmfa_hand_values():
    # swapped pairs: s = [[0, 1], [1, 0]], hinge 0.2 - 0 + 1 per anchor, both directions; same affinity
    loss = cmfa_loss(EYE2, EYE2.flip(0), torch.tensor([0, 1]), margin=0.2)
    assert loss.item() == pytest.approx(2.4, rel=1e-6)
    # one label (no negative -> no triplet); affinity: I vs all-ones -> mean of (0, 1, 1, 0) squared
    loss = cmfa_loss(EYE2, tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("term", ["imima", "sdm", "cmpm", "cmfa"])
def test_gradients_reach_both_embeddings(term):
    v, t, labels = random_batch(seed=4)
    loss = {
        "imima": lambda: imima_loss(v, t, labels, 0.07, torch.zeros(2)),
        "sdm": lambda: sdm_loss(v, t, labels, 0.07),
        "cmpm": lambda: cmpm_loss(v, t, labels),
        "cmfa": lambda: cmfa_loss(v, t, labels),
    }[term]()
    loss.backward()
    for emb in (v, t):
        assert torch.isfinite(emb.grad).all()
        assert emb.grad.abs().sum() > 0


# ---------------------------------------------------------------- masked language model


def test_mlm_ignores_unmasked_positions_and_equals_ce_on_masked():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 7, generator=gen)
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[1, 3] = 3, 6
    masked = labels != -100
    expected = F.cross_entropy(logits[masked], labels[masked])
    assert mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[~masked] = 50 * torch.randn(int((~masked).sum()), 7, generator=gen)
    assert mlm_loss(changed, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mlm_zero_with_grad_when_nothing_masked():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


# ---------------------------------------------------------------- composite loss


def model_outputs(seed: int = 6, b: int = 8, e: int = 16, length: int = 5, vocab: int = 11) -> dict:
    """Every input CompositeLoss.forward accepts, as random tensors (both classes present)."""
    gen = torch.Generator().manual_seed(seed)
    mlm_labels = torch.full((b, length), -100)
    mlm_labels[:, 1] = torch.randint(vocab, (b,), generator=gen)
    return {
        "labels": torch.tensor([0, 1] * (b // 2)),
        "logits": torch.randn(b, 2, generator=gen),
        "vision_embedding": torch.randn(b, e, generator=gen),
        "text_embedding": torch.randn(b, e, generator=gen),
        "mlm_logits": torch.randn(b, length, vocab, generator=gen),
        "mlm_labels": mlm_labels,
        "vision_logits": torch.randn(b, 2, generator=gen),
        "text_logits": torch.randn(b, 2, generator=gen),
        "numbers": torch.randn(b, 2, generator=gen),
        "numbers_target": torch.stack([torch.randint(18, 95, (b,), generator=gen),
                                       torch.randint(3, 16, (b,), generator=gen)], dim=1).float(),
    }


ALL_TERMS = {"ce": 1.0, "imima": 0.7, "sdm": 0.5, "mlm": 0.25, "blend": 2.0, "cmpm": 0.1, "cmfa": 1.5,
             "numbers": 0.3}


def test_composite_total_is_weighted_sum_and_reports_every_term():
    loss = CompositeLoss(ALL_TERMS, temperature=0.1)
    x = model_outputs()
    total, terms = loss(**x)
    assert set(terms) == {"total", *LOSS_TERMS} and not any(v.requires_grad for v in terms.values())
    report = {name: value.item() for name, value in terms.items()}
    assert total.item() == pytest.approx(report["total"], rel=1e-6)
    assert report["total"] == pytest.approx(sum(w * report[n] for n, w in ALL_TERMS.items()), rel=1e-5)
    v, t, labels = x["vision_embedding"], x["text_embedding"], x["labels"]
    assert report["sdm"] == pytest.approx(sdm_loss(v, t, labels, 0.1).item(), rel=1e-6)
    assert report["ce"] == pytest.approx(ce_loss(x["logits"], labels).item(), rel=1e-6)


def test_composite_imima_mix_is_a_trained_parameter():
    loss = CompositeLoss([("ce", 1.0), ("imima", 1.0)])
    assert dict(loss.named_parameters()).keys() == {"imima_mix"}
    total, _ = loss(**model_outputs())
    total.backward()
    assert loss.imima_mix.grad is not None and loss.imima_mix.grad.abs().sum() > 0
    assert list(CompositeLoss({"ce": 1.0}).parameters()) == []


def test_composite_from_config():
    loss = CompositeLoss.from_config(LossConfig(terms=(("ce", 1.0), ("mlm", 0.5)), temperature=0.2))
    assert loss.terms == (("ce", 1.0), ("mlm", 0.5)) and loss.names == ("ce", "mlm")
    assert loss.temperature == 0.2


def test_composite_missing_input_names_it():
    x = model_outputs()
    del x["mlm_logits"]
    with pytest.raises(IchproError, match="mlm needs mlm_logits and mlm_labels: build the model with"):
        CompositeLoss({"ce": 1.0, "mlm": 1.0})(**x)
    with pytest.raises(IchproError, match="sdm needs vision_embedding and text_embedding"):
        CompositeLoss({"sdm": 1.0})(labels=x["labels"], logits=x["logits"])


@pytest.mark.parametrize(("terms", "match"), [
    ({"ce": 1.0, "focal": 1.0}, r"unknown loss term 'focal' \(--loss\); choose among ce, imima, sdm, mlm"),
    ({"ce": -1.0}, r"weight of loss term 'ce' \(--loss\) must be finite and >= 0"),
    ({"ce": math.nan}, r"must be finite"),
    ({}, r"no loss terms"),
    ([("ce", 1.0), ("ce", 2.0)], r"'ce' is given twice"),
])
def test_composite_rejects_bad_terms(terms, match):
    with pytest.raises(IchproError, match=match):
        CompositeLoss(terms)


def test_composite_rejects_bad_temperature():
    with pytest.raises(IchproError, match="temperature must be > 0"):
        CompositeLoss({"imima": 1.0}, temperature=0.0)


def test_composite_close_to_float32_under_bfloat16_autocast():
    loss = CompositeLoss(ALL_TERMS)
    x = model_outputs()
    _, full = loss(**x)
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, low = loss(**half)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    for name, value in full.items():
        assert low[name].item() == pytest.approx(value.item(), rel=0.05), name


def test_terms_computed_in_float32_under_autocast():
    loss = CompositeLoss(ALL_TERMS)
    x = model_outputs()
    _, full = loss(**x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, inside = loss(**x)  # float32 inputs: autocast must not push the similarities to bf16
    for name, value in full.items():
        assert inside[name].item() == pytest.approx(value.item(), rel=1e-5), name


# ---------------------------------------------------------------- CLI spec


@pytest.mark.parametrize(("spec", "expected"), [
    ("ce=1,imima=1,sdm=0.5,mlm=0.5", (("ce", 1.0), ("imima", 1.0), ("sdm", 0.5), ("mlm", 0.5))),
    ("vtmf", (("ce", 1.0), ("imima", 1.0), ("sdm", 1.0), ("mlm", 1.0))),
    ("ce", (("ce", 1.0),)),
    (" ce = 1 , cmpm=0.3 ", (("ce", 1.0), ("cmpm", 0.3))),
    ("vtmf,blend=0.5", (("ce", 1.0), ("imima", 1.0), ("sdm", 1.0), ("mlm", 1.0), ("blend", 0.5))),
])
def test_parse_loss_spec(spec, expected):
    assert parse_loss_spec(spec) == expected


@pytest.mark.parametrize(("spec", "match"), [
    ("", r"empty term"),
    ("ce=1,,sdm=1", r"empty term"),
    ("ce=abc", r"weight of 'ce' is 'abc', not a number"),
    ("ce=", r"weight of 'ce' is '', not a number"),
    ("ce=1,focal=2", r"unknown loss term 'focal'"),
    ("ce=-0.5", r"must be finite and >= 0"),
    ("vtmf=2", r"'vtmf' is shorthand for ce=1,imima=1,sdm=1,mlm=1 and takes no weight"),
    ("vtmf,ce=2", r"'ce' is given twice"),
])
def test_parse_loss_spec_rejects_bad_syntax(spec, match):
    with pytest.raises(IchproError, match=match):
        parse_loss_spec(spec)
