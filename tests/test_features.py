"""Frozen-encoder outputs: disk cache keys, hits and misses, and equality with direct encoding."""

from dataclasses import replace

import pytest
import torch

from ichpro.batches import BatchSource
from ichpro.config import get_profile
from ichpro.features import cache_key, cached, files_digest, weights_digest
from ichpro.manifest import load_manifest
from ichpro.text import load_text_backbone
from ichpro.train import encoders_profile, fresh_model

# a seeded random vision encoder: these tests are about the cache, not about pretraining
SMOKE = replace(get_profile("smoke"), pretrain=None)


@pytest.fixture(scope="module")
def manifest(smoke_cohort):
    return load_manifest(smoke_cohort / "manifest.csv").iloc[:24].reset_index(drop=True)


@pytest.fixture(scope="module")
def text(manifest):
    return load_text_backbone("tiny", reports=manifest["report"].tolist(), seed=0)


def encoded(profile, manifest, text, cache_dir, seed=0):
    """A source prepared for the profile's model, and the model that encoded the patients."""
    source = BatchSource(manifest, profile, text, cache_dir)
    model, encoders = fresh_model(profile, text, seed), fresh_model(encoders_profile(profile), text, seed)
    source.prepare(model, lambda: encoders, torch.device("cpu"), seed, quiet=True)
    return source, encoders


def test_cache_hits_and_misses_follow_what_the_outputs_depend_on(manifest, text, tmp_path):
    first, _ = encoded(SMOKE, manifest, text, tmp_path)
    assert first.cache_hits == {"vision": False, "text": False, "masked": False}
    again, _ = encoded(SMOKE, manifest, text, tmp_path)
    assert again.cache_hits == {"vision": True, "text": True, "masked": True}
    for key, value in first.features.items():
        assert torch.equal(value, again.features[key])
    # another preprocessing changes only the CT features
    wider = replace(SMOKE, preprocess=replace(SMOKE.preprocess, hu_window=(0.0, 80.0)))
    assert encoded(wider, manifest, text, tmp_path)[0].cache_hits == {"vision": False, "text": True,
                                                                       "masked": True}
    # another seed: other random vision weights and other masks; the given text encoder is unchanged
    assert encoded(SMOKE, manifest, text, tmp_path, seed=1)[0].cache_hits == {"vision": False, "text": True,
                                                                              "masked": False}
    # other patients change the CT and report entries
    fewer = encoded(SMOKE, manifest.iloc[:20].reset_index(drop=True), text, tmp_path)[0]
    assert not any(fewer.cache_hits.values())


def test_cached_outputs_equal_the_encoders_outputs(manifest, text, tmp_path):
    source, model = encoded(SMOKE, manifest, text, tmp_path)
    idx = [3, 0, 17]
    batch = source.batch(idx, torch.device("cpu"), epoch=2)
    direct = source.batch(idx, torch.device("cpu"))  # features, no masked variant without an epoch
    assert "ct" not in batch and "masked_text_states" not in direct and "labels" not in direct
    assert batch["labels"].tolist() == manifest["label"].iloc[idx].tolist()
    with torch.no_grad():
        ct = torch.stack([source.dataset[i]["ct"] for i in idx])
        torch.testing.assert_close(batch["vision_features"], model.vision(ct))
        states = model.text(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(batch["text_states"], states)
    labels = batch["mlm_labels"]
    assert labels.shape == batch["input_ids"].shape and (labels != -100).any(dim=1).all()


def test_masked_variants_turn_with_the_epochs(manifest, text, tmp_path):
    source, _ = encoded(SMOKE, manifest, text, tmp_path)
    variants = SMOKE.loss.mlm_variants
    labels = [source.batch(list(range(8)), torch.device("cpu"), epoch=e)["mlm_labels"]
              for e in range(1, variants + 2)]
    assert not torch.equal(labels[0], labels[1])
    assert torch.equal(labels[0], labels[variants])  # epoch variants + 1 reuses the first variant


def test_unfrozen_encoders_are_not_precomputed(manifest, text, tmp_path):
    end_to_end = replace(SMOKE, model=replace(SMOKE.model, freeze_vision=False))
    source, _ = encoded(end_to_end, manifest, text, tmp_path)
    batch = source.batch([0, 1], torch.device("cpu"))
    assert "vision_features" not in batch and batch["ct"].shape == (2, 1, *SMOKE.preprocess.spatial_size)
    assert "text_states" in batch and source.cache_hits.keys() == {"text", "masked"}


def test_a_model_that_reads_no_encoder_output_encodes_nothing(manifest, text, tmp_path):
    image_only = replace(SMOKE, model=replace(SMOKE.model, comparator="small3dcnn"))
    source = BatchSource(manifest, image_only, text, tmp_path)
    source.prepare(fresh_model(image_only, text, 0), lambda: pytest.fail("encoders built"),
                   torch.device("cpu"), 0, quiet=True)
    assert source.features["ct"].shape == (len(manifest), 1, *SMOKE.model.comparator_input)
    assert "vision_features" not in source.features and "text_states" not in source.features


def test_digests_and_keys(tmp_path):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert weights_digest(a) != weights_digest(b)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    (tmp_path / "x.nii").write_bytes(b"1")
    first = files_digest([tmp_path / "x.nii"])
    (tmp_path / "x.nii").write_bytes(b"2")
    assert files_digest([tmp_path / "x.nii"]) != first
    assert cache_key("vision", w=1) != cache_key("vision", w=2)
    assert cache_key("vision", w=1).startswith("vision-")
    calls = []
    compute = lambda: calls.append(1) or {"x": torch.ones(2)}  # noqa: E731
    assert cached(tmp_path, "k", compute)[1] is False and cached(tmp_path, "k", compute)[1] is True
    assert cached(None, "k", compute)[1] is False and len(calls) == 2


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else
                     data[:-7] + bytes([data[-7] ^ 0xFF]) + data[-6:])


@pytest.mark.parametrize("how", ["truncated", "flipped byte"])
def test_a_damaged_cache_entry_is_recomputed_with_one_line(tmp_path, capsys, how):
    tensors = {"x": torch.arange(1000, dtype=torch.float32)}
    calls = []

    def compute():
        calls.append(1)
        return tensors

    cached(tmp_path, "k", compute)
    entry = tmp_path / "k.safetensors"
    _damage(entry, how)
    again, hit = cached(tmp_path, "k", compute)
    assert not hit and len(calls) == 2 and torch.equal(again["x"], tensors["x"])
    assert f"cache entry {entry} is damaged" in capsys.readouterr().err
    assert cached(tmp_path, "k", compute)[1]  # healed: a hit again


def test_a_damaged_preprocessed_ct_is_recomputed(manifest, tmp_path, capsys):
    from ichpro.data import make_dataset

    first = make_dataset(manifest.head(2), SMOKE.preprocess, tmp_path)[0]["ct"]
    entry = next(tmp_path.rglob("*.safetensors"))
    _damage(entry, "flipped byte")
    assert torch.equal(make_dataset(manifest.head(2), SMOKE.preprocess, tmp_path)[0]["ct"], first)
    assert "is damaged" in capsys.readouterr().err


WRITER = """
import sys, time, torch
from ichpro.features import cached
def compute():
    time.sleep(0.5)
    return {"x": torch.arange(200_000, dtype=torch.float32)}
for _ in range(5):
    tensors, _ = cached(sys.argv[1], sys.argv[2], compute)
    assert torch.equal(tensors["x"], torch.arange(200_000, dtype=torch.float32))
"""


def test_two_processes_sharing_a_cache_never_read_a_partial_entry(tmp_path):
    import subprocess
    import sys

    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"k{i % 2}"],
                                stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [w.communicate()[1] for w in writers]
    assert all(w.returncode == 0 for w in writers), errors
    assert not any("damaged" in e for e in errors) and not list(tmp_path.glob("*.tmp"))
