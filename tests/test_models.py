"""ICHPro model: shapes, parameter counts, gradients, the report matters, attention, determinism."""

import copy
import math
from dataclasses import replace

import pytest
import torch
from sample_reports import REPORTS
from transformers import BertConfig, BertModel

from ichpro.config import FUSION_STRUCTURES, LossConfig, get_profile
from ichpro.errors import IchproError
from ichpro.losses import CompositeLoss, mlm_loss
from ichpro.models import build_model
from ichpro.models.encoders import TextEncoder, VisionEncoder
from ichpro.models.fusion import CMAF, TRT, FusionStack, SoftPool3d
from ichpro.models.heads import SequenceHeader
from ichpro.text import load_text_backbone, mask_tokens, tokenize

SMOKE = get_profile("smoke")


@pytest.fixture(scope="module")
def tiny():
    return load_text_backbone("tiny", reports=REPORTS * 5, seed=0)


def make_batch(backbone, size=(16, 64, 64), seed=0, reports=REPORTS):
    g = torch.Generator().manual_seed(seed)
    batch = tokenize(backbone.tokenizer, reports, max_tokens=128)
    batch["ct"] = torch.rand(len(reports), 1, *size, generator=g)
    batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(batch["input_ids"], backbone.tokenizer,
                                                              generator=g)
    batch["labels"] = torch.tensor([0, 1, 1, 0][: len(reports)])
    return batch


def smoke_model(backbone, seed=0, **changes):
    torch.manual_seed(seed)  # each model gets its own copy of the text encoder
    return build_model(replace(SMOKE.model, **changes), copy.deepcopy(backbone.model), SMOKE.loss)


@pytest.mark.parametrize("structure", FUSION_STRUCTURES)
def test_shapes_and_attention_rows_for_every_structure(tiny, structure):
    model = smoke_model(tiny, fusion=structure)
    out = model(make_batch(tiny))
    dim, grid = SMOKE.model.dim, SMOKE.model.grid
    assert out.logits.shape == (4, 2)
    assert out.vision_embedding.shape == out.text_embedding.shape == (4, dim)
    assert out.fused.shape == (4, dim, *(2 * g for g in grid))
    masked = (make_batch(tiny)["mlm_labels"] != -100).sum().item()
    assert out.mlm_logits.shape == (masked, len(tiny.tokenizer))  # decoded at masked positions only
    assert out.mlm_labels.shape == (masked,) and (out.mlm_labels != -100).all()
    expected_blocks = {"self": 1, "cross": 2}  # maps per stage kind
    assert len(out.attentions) == sum(expected_blocks[k] for k in structure.split("-"))
    for name, weights in out.attentions.items():
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5), name
        volume = out.attention_volume(name, (16, 64, 64))
        assert volume.shape == (4, 16, 64, 64) and torch.isfinite(volume).all()


def test_cpu_profile_shapes():
    cpu = get_profile("cpu")
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=cpu.model.text_layers,
                                num_attention_heads=12, intermediate_size=64))
    model = build_model(cpu.model, bert, cpu.loss).eval()
    ids = torch.randint(5, 100, (1, 20))
    with torch.no_grad():
        out = model({"ct": torch.rand(1, 1, *cpu.preprocess.spatial_size), "input_ids": ids,
                     "attention_mask": torch.ones_like(ids)})
    assert out.logits.shape == (1, 2) and out.fused.shape == (1, 64, 4, 8, 8)  # twice the 2x4x4 grid


def test_paper_profile_parameter_counts_and_shapes():
    paper = get_profile("paper").model
    vision = VisionEncoder(paper.vision_depth, paper.vision_widths, paper.vision_no_max_pool)
    header = SequenceHeader(paper.dim, paper.header_blocks, paper.header_growth)
    bert = BertModel(BertConfig(vocab_size=28996), add_pooling_layer=False)  # BioClinicalBERT's size
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert 45 < count(vision) < 47  # 3D ResNet-50
    assert 5.3 < count(header.densenet) < 5.7  # 1D DenseNet-121
    assert 107 < count(bert) < 110  # BERT-base
    model = build_model(paper, bert).eval()
    ids = torch.randint(5, 1000, (1, 12))
    with torch.no_grad():  # the paper's 32 slices; a 128 x 128 plane keeps the test light
        out = model({"ct": torch.rand(1, 1, 32, 128, 128), "input_ids": ids,
                     "attention_mask": torch.ones_like(ids)})
    assert out.logits.shape == (1, 2)
    assert "stage2_mhsaf_self" in out.attentions and out.attentions["stage2_mhsaf_self"].shape[1] == 16


def test_full_vtmf_loss_reaches_every_trainable_parameter(tiny):
    model = smoke_model(tiny, freeze_vision=False, freeze_text=False)  # the paper's end-to-end setting
    batch = make_batch(tiny)
    out = model(batch)
    out.loss.backward()
    assert set(out.terms) == {"total", "ce", "imima", "sdm", "mlm"}
    assert out.terms["total"].item() == pytest.approx(out.loss.item())
    assert not out.terms["total"].requires_grad  # reported, detached
    # the objective is part of the model: IMIMA's learnable mix is one of its parameters
    names = [n for n, _ in model.named_parameters()]
    assert "objective.imima_mix" in names
    silent = [n for n, p in model.named_parameters()
              if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not silent, silent


def test_the_loss_is_the_objective_of_the_outputs_and_absent_without_labels(tiny):
    model = smoke_model(tiny).eval()
    batch = make_batch(tiny)
    with torch.no_grad():
        out = model(batch)
        alone = CompositeLoss.from_config(SMOKE.loss)(
            labels=batch["labels"], logits=out.logits, vision_embedding=out.vision_embedding,
            text_embedding=out.text_embedding, mlm_logits=out.mlm_logits, mlm_labels=out.mlm_labels)[0]
        unlabelled = model({k: v for k, v in batch.items() if k != "labels"})
        no_mlm_labels = model({k: v for k, v in batch.items() if k != "mlm_labels"})
    torch.testing.assert_close(out.loss, alone)
    assert unlabelled.loss is None and unlabelled.terms == {}
    assert no_mlm_labels.loss is None  # the MLM term's targets are missing: no loss, not a wrong one
    torch.testing.assert_close(unlabelled.logits, out.logits)


def test_the_model_declares_what_it_reads(tiny):
    frozen = smoke_model(tiny)
    assert frozen.inputs == ("input_ids", "attention_mask", "vision_features", "text_states",
                             "masked_text_states")
    assert frozen.targets == ("mlm_labels",)
    assert frozen.frozen_prefixes == ("vision.", "text.", "mlm.word_embeddings.")
    end_to_end = smoke_model(tiny, freeze_vision=False, freeze_text=False)
    assert end_to_end.inputs == ("input_ids", "attention_mask", "ct", "mlm_input_ids")
    assert end_to_end.frozen_prefixes == ()
    text_only = build_model(replace(SMOKE.model, modality="text"), copy.deepcopy(tiny.model),
                            LossConfig(terms=(("ce", 1.0),)))
    assert text_only.inputs == ("input_ids", "attention_mask", "text_states")
    assert text_only.targets == () and frozen.gradcam_layer == "vision" and frozen.auxiliary_tasks == ()


def test_fitting_the_training_patients_restricts_the_mlm_vocabulary_to_their_words(tiny):
    batch = make_batch(tiny)
    for vocabulary in ("reports", "full"):
        loss = replace(SMOKE.loss, mlm_vocabulary=vocabulary)
        model = build_model(SMOKE.model, copy.deepcopy(tiny.model), loss)
        model.fit_training_patients(batch)
        if vocabulary == "reports":
            words = torch.unique(batch["input_ids"][batch["attention_mask"].bool()])
            assert torch.equal(model.mlm.vocabulary, words)
    full = model  # mlm_vocabulary "full": nothing to fit
    assert full.mlm.vocabulary is None


def test_the_report_and_the_ct_both_change_the_prediction(tiny):
    model = smoke_model(tiny).eval()
    batch = make_batch(tiny)
    with torch.no_grad():
        base = model(batch)
        edited = model(make_batch(tiny, reports=[REPORTS[1], REPORTS[0], REPORTS[3], REPORTS[2]]))
        blank = model({**batch, "ct": torch.zeros_like(batch["ct"])})
    cmaf = "stage1_cmaf_text_to_vision"
    assert not torch.allclose(base.logits, edited.logits)
    assert not torch.allclose(base.attentions[cmaf], edited.attentions[cmaf])
    assert not torch.allclose(base.logits, blank.logits)
    assert not torch.allclose(base.attentions[cmaf], blank.attentions[cmaf])


def test_same_seed_gives_identical_outputs(tiny):
    batch = make_batch(tiny)
    a = smoke_model(tiny, seed=3).eval()(batch)
    b = smoke_model(tiny, seed=3).eval()(batch)
    c = smoke_model(tiny, seed=4).eval()(batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mlm_logits, b.mlm_logits)
    assert not torch.equal(a.logits, c.logits)


def test_vision_dropout_hides_the_ct_from_the_fusion_of_some_training_samples_only(tiny):
    batch = make_batch(tiny)
    blank = {**batch, "ct": torch.zeros_like(batch["ct"])}
    model = smoke_model(tiny, vision_dropout=0.5)
    dropped = model._vision_dropout(torch.ones(400, 2, 1, 1, 1), None)
    assert set(dropped.flatten().tolist()) == {0.0, 1.0}  # whole samples, none rescaled
    assert torch.equal(dropped[:, 0], dropped[:, 1]) and 0.4 < (dropped[:, 0] == 0).float().mean() < 0.6
    draw = torch.tensor([0.1, 0.7, 0.49, 0.5])  # the engine's draws: the samples below the rate drop
    assert model._vision_dropout(torch.ones(4, 2, 1, 1, 1), draw)[:, 0, 0, 0, 0].tolist() == [0, 1, 0, 1]
    assert model.training_draws == ("vision_dropout_draw",)
    assert smoke_model(tiny, vision_dropout=0).training_draws == ()
    always = smoke_model(tiny, vision_dropout=0.999)
    torch.manual_seed(0)
    with_ct = always(batch)
    torch.manual_seed(0)
    without_ct = always(blank)
    assert torch.equal(with_ct.logits, without_ct.logits)  # the fusion saw no CT ...
    assert not torch.allclose(with_ct.vision_embedding, without_ct.vision_embedding)  # alignment did
    with torch.no_grad():  # in evaluation every sample's fusion reads its CT, as without dropout
        assert torch.equal(model.eval()(batch).logits, smoke_model(tiny).eval()(batch).logits)


def test_runs_under_bf16_autocast(tiny):
    model = smoke_model(tiny).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch(tiny))
    assert torch.isfinite(out.logits.float()).all()


def test_softpool_matches_its_definition_by_brute_force():
    x = torch.randn(2, 3, 4, 6, 2) * 5
    pooled = SoftPool3d((2, 3, 1))(x)
    assert pooled.shape == (2, 3, 2, 2, 2)
    for b in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    for k in range(2):
                        window = x[b, c, 2 * i:2 * i + 2, 3 * j:3 * j + 3, k:k + 1].flatten()
                        expected = (window.exp() * window).sum() / window.exp().sum()
                        assert torch.isclose(pooled[b, c, i, j, k], expected, atol=1e-5)
    huge = SoftPool3d((2, 2, 2))(torch.full((1, 1, 2, 2, 2), 1000.0))
    assert torch.isfinite(huge).all() and torch.allclose(huge, torch.tensor(1000.0))


def test_cmaf_direction_weights_are_a_softmax_pair():
    cmaf = CMAF(dim=8, heads=2, grid=(2, 2, 2))
    assert torch.allclose(cmaf.direction.softmax(0).sum(), torch.tensor(1.0))
    fused, maps = cmaf(torch.randn(1, 8, 2, 2, 2), torch.randn(1, 8, 2, 2, 2))
    assert fused.shape == (1, 8, 2, 2, 2) and maps["vision_to_text"].shape == (1, 2, 1, 1)


def test_frozen_encoders_get_no_gradient_and_stay_in_eval_mode(tiny):
    model = smoke_model(tiny, freeze_vision=True, freeze_text=True)
    model.train()
    assert not model.vision.training and not model.text.training and model.fusion.training
    out = model(make_batch(tiny))
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is None for p in model.text.parameters())
    assert model.header.project.weight.grad is not None


def test_vision_weights_load_from_a_medicalnet_style_state_dict(tmp_path, tiny):
    source = VisionEncoder(10, (8, 16, 32, 64), no_max_pool=True)
    path = tmp_path / "medicalnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.resnet.state_dict().items()}}, path)
    model = smoke_model(tiny, vision_weights=str(path))
    for key, value in source.resnet.state_dict().items():
        assert torch.equal(model.vision.resnet.state_dict()[key], value)
    with pytest.raises(IchproError, match="not found"):
        smoke_model(tiny, vision_weights=str(tmp_path / "missing.pth"))
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(IchproError, match="no weight matching"):
        smoke_model(tiny, vision_weights=str(tmp_path / "other.pth"))


def test_bad_fusion_configuration_is_rejected():
    with pytest.raises(IchproError, match="unknown fusion structure 'cross-cross-self'"):
        FusionStack("cross-cross-self", 32, 4, (2, 4, 4))
    with pytest.raises(IchproError, match="not divisible by 5 attention heads"):
        FusionStack("cross-self", 32, 5, (2, 4, 4))


def test_blend_loss_builds_unimodal_heads(tiny):
    torch.manual_seed(0)
    terms = LossConfig(terms=(("ce", 1.0), ("blend", 1.0)))
    model = build_model(SMOKE.model, copy.deepcopy(tiny.model), terms)
    out = model(make_batch(tiny))
    assert model.mlm is None and out.mlm_logits is None
    assert out.vision_logits.shape == out.text_logits.shape == (4, 2)


def test_the_numbers_term_reads_age_and_gcs_from_the_fused_representation(tiny):
    torch.manual_seed(0)
    loss = LossConfig(terms=(("ce", 1.0), ("numbers", 2.0)))
    model = build_model(SMOKE.model, copy.deepcopy(tiny.model), loss)
    assert model.targets == ("age", "gcs")
    batch = make_batch(tiny)
    assert model(batch).loss is None  # the term's targets are missing: no loss, not a wrong one
    batch["age"], batch["gcs"] = torch.tensor([56.0, 81, 67, 45]), torch.tensor([13.0, 5, 9, 15])
    out = model(batch)
    assert out.numbers.shape == (4, 2)
    standardised = torch.stack([(batch["age"] - 65) / 15, (batch["gcs"] - 10) / 4], dim=1)
    expected = ((out.numbers - standardised) ** 2).mean()
    assert out.terms["numbers"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((out.terms["ce"] + 2 * out.terms["numbers"]).item(), rel=1e-5)
    out.loss.backward()
    assert model.numbers.weight.grad.abs().sum() > 0 and model.trt.queries.grad.abs().sum() > 0


def test_precomputed_encoder_outputs_give_the_same_prediction(tiny):
    model = smoke_model(tiny).eval()
    batch = make_batch(tiny)
    with torch.no_grad():
        direct = model(batch)
        f_v, f_t = model.encode(batch["ct"], batch["input_ids"], batch["attention_mask"])
        masked = model.text(batch["mlm_input_ids"], batch["attention_mask"])
        cached = model({"attention_mask": batch["attention_mask"], "vision_features": f_v, "text_states": f_t,
                        "masked_text_states": masked, "mlm_labels": batch["mlm_labels"]})
    assert torch.allclose(direct.logits, cached.logits, atol=1e-6)
    assert torch.allclose(direct.mlm_logits, cached.mlm_logits, atol=1e-5)


def test_ce_alone_builds_no_unused_branch(tiny):
    torch.manual_seed(0)
    model = build_model(replace(SMOKE.model, freeze_vision=False, freeze_text=False),
                        copy.deepcopy(tiny.model), LossConfig(terms=(("ce", 1.0),)))
    assert model.projections is None and model.mlm is None and model.unimodal is None
    out = model(make_batch(tiny))
    assert out.vision_embedding is None
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_single_modality_models_ignore_the_other_input(tiny, modality):
    torch.manual_seed(0)
    cfg = replace(SMOKE.model, modality=modality, freeze_vision=False, freeze_text=False)
    model = build_model(cfg, copy.deepcopy(tiny.model), LossConfig(terms=(("ce", 1.0),))).eval()
    batch = make_batch(tiny)
    other = make_batch(tiny, seed=1, reports=[REPORTS[1], REPORTS[0], REPORTS[3], REPORTS[2]])
    with torch.no_grad():
        out = model(batch)
        swapped_ct = model({**batch, "ct": other["ct"]})
        swapped_report = model({**other, "ct": batch["ct"]})
    assert out.logits.shape == (4, 2) and list(out.attentions) == ["stage1_mhsaf_self"]
    same, changed = (swapped_report, swapped_ct) if modality == "vision" else (swapped_ct, swapped_report)
    assert torch.equal(out.logits, same.logits) and not torch.allclose(out.logits, changed.logits)
    unused = model.text if modality == "vision" else model.vision
    assert not any(p.requires_grad for p in unused.parameters())
    with pytest.raises(IchproError, match="cross-entropy alone"):
        build_model(cfg, copy.deepcopy(tiny.model), SMOKE.loss)


def test_trt_queries_read_the_report_and_ignore_padding():
    trt = TRT(hidden=16, dim=8, max_tokens=12, grid=(2, 2, 2), heads=2).eval()
    states = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    grid, attention = trt(states, mask)
    assert grid.shape == (2, 8, 2, 2, 2) and attention.shape == (2, 2, 8, 6)  # (B, heads, |G|, L)
    assert torch.allclose(attention.sum(-1), torch.ones(())) and (attention[1, :, :, 3:] == 0).all()
    padded = torch.cat([states, torch.randn(2, 4, 16)], dim=1)  # more padding, other junk in it
    longer = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    assert torch.allclose(trt(padded, longer)[0], grid, atol=1e-6)
    edited = states.clone()
    edited[1, 0] = torch.randn(16)  # a real token of report 1 changes its pseudo-volume only
    moved = trt(edited, mask)[0]
    assert torch.equal(moved[0], grid[0]) and not torch.allclose(moved[1], grid[1])
    cells = grid.flatten(2).transpose(1, 2)
    assert not torch.allclose(cells[:, 0], cells[:, 1])  # each cell has its own query and position


def test_positional_trt_keeps_the_token_position_map(tiny):
    trt = TRT(hidden=16, dim=8, max_tokens=12, grid=(2, 2, 2), heads=2, mode="positional")
    grid, attention = trt(torch.randn(2, 6, 16), torch.ones(2, 6))
    assert grid.shape == (2, 8, 2, 2, 2) and attention is None
    out = smoke_model(tiny, trt="positional")(make_batch(tiny))
    assert out.token_attention is None and out.logits.shape == (4, 2)
    with pytest.raises(IchproError, match="unknown TRT mode 'words'"):
        TRT(16, 8, 12, (2, 2, 2), 2, mode="words")


def test_the_model_returns_which_tokens_each_grid_cell_reads(tiny):
    batch = make_batch(tiny)
    out = smoke_model(tiny)(batch)
    cells, length = math.prod(SMOKE.model.grid), batch["input_ids"].shape[1]
    assert out.token_attention.shape == (4, SMOKE.model.heads, cells, length)
    padding = batch["attention_mask"] == 0
    assert (out.token_attention.permute(0, 3, 1, 2)[padding] == 0).all()


def test_text_layers_take_the_states_of_that_layer(tiny):
    batch = make_batch(tiny)
    with torch.no_grad():
        every = copy.deepcopy(tiny.model).eval()(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"],
                                                 output_hidden_states=True).hidden_states
        encoder = TextEncoder(copy.deepcopy(tiny.model), layers=1).eval()
        first = encoder(batch["input_ids"], batch["attention_mask"])
    assert len(encoder.bert.encoder.layer) == 1 and torch.allclose(first, every[1], atol=1e-6)
    assert smoke_model(tiny, text_layers=1).text.bert.config.num_hidden_layers == 1
    with pytest.raises(IchproError, match="text_layers 3 is not between 1 and the encoder's 2 layers"):
        TextEncoder(copy.deepcopy(tiny.model), layers=3)


def test_cmaf_pool_sets_the_grid_cmaf_attends_over():
    assert CMAF(dim=8, heads=2, grid=(2, 4, 4)).pooled_grid == (1, 2, 2)  # SoftPool 2 on even sides
    cmaf = CMAF(dim=8, heads=2, grid=(2, 4, 4), pool=(1, 1, 1))
    fused, maps = cmaf(torch.randn(1, 8, 2, 4, 4), torch.randn(1, 8, 2, 4, 4))
    assert cmaf.pooled_grid == (2, 4, 4) and maps["text_to_vision"].shape == (1, 2, 32, 32)
    cpu = get_profile("cpu").model
    stack = FusionStack(cpu.fusion, cpu.dim, cpu.heads, cpu.grid, cmaf_pool=cpu.cmaf_pool)
    assert math.prod(stack.map_grids["stage1_cmaf_text_to_vision"]) >= 32  # a grid to point with


def test_mlm_over_the_reports_words_is_the_full_softmax_renormalised_on_them(tiny):
    model, batch = smoke_model(tiny).eval(), make_batch(tiny)
    out_full = model(batch)
    vocabulary = torch.unique(batch["input_ids"])
    model.mlm.restrict_vocabulary(vocabulary)
    out = model(batch)
    assert out.mlm_logits.shape == (len(out_full.mlm_labels), len(vocabulary))
    # the targets index the same tokens, and the logits are the full ones at those columns
    assert torch.equal(vocabulary[out.mlm_labels], out_full.mlm_labels)
    torch.testing.assert_close(out.mlm_logits, out_full.mlm_logits[:, vocabulary])
    expected = -(out_full.mlm_logits[:, vocabulary].log_softmax(-1)
                 .gather(1, out.mlm_labels[:, None])).mean()
    torch.testing.assert_close(mlm_loss(out.mlm_logits, out.mlm_labels), expected)
    model.mlm.restrict_vocabulary(vocabulary[vocabulary != out_full.mlm_labels[0]])
    with pytest.raises(IchproError, match="not in the MLM head's restricted vocabulary"):
        model(batch)
    model.mlm.restrict_vocabulary(None)
    torch.testing.assert_close(model(batch).mlm_logits, out_full.mlm_logits)
