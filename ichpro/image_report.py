"""VDAFM's image-derived text, written without a language model: haematoma measurements of a CT
(:func:`measure_ct`), a fixed template that turns them into a semi-structured report
(:func:`image_report`), and the template's one-token-per-word tokenizer (:func:`template_tokens`)."""

from __future__ import annotations

import re

import numpy as np
import torch
from scipy import ndimage

from ichpro.config import PAPER_WINDOW
from ichpro.data import brain_mask, load_ct

#: Blood on a non-contrast CT (HU); the paper's window [15, 400] keeps it well inside [0, 1].
BLOOD_HU = (50.0, 100.0)
_REPORT = ("Hyperdense haematoma of {volume} ml in the {side} hemisphere, {level} third. "
           "Blood {reach} the midline.")
_NO_BLOOD = "No hyperdense haematoma."
_CHOICES = {"side": ("right", "left"), "level": ("inferior", "middle", "superior"),
            "reach": ("reaches", "does not reach"), "volume": ("less than 1",)}
_TOKEN = re.compile(r"[a-z]+|\d|[^\sa-z\d]")
_WRITTEN = " ".join([re.sub(r"\{\w+\}", " ", _REPORT), _NO_BLOOD, "0123456789", *sum(_CHOICES.values(), ())])
#: The template's whole vocabulary: padding, unknown, digits, and every word and mark it writes.
TEMPLATE_VOCAB = ("[pad]", "[unk]", *sorted(set(_TOKEN.findall(_WRITTEN.lower()))))
TEMPLATE_MAX_TOKENS = 48


def measure_ct(ct: torch.Tensor, voxel_ml: float, window: tuple[float, float] = PAPER_WINDOW,
               blood_hu: tuple[float, float] = BLOOD_HU, midline_band: float = 0.1) -> dict:
    """Haematoma measurements of a windowed, skull-stripped CT (1, D, H, W) on the model's axes.

    Voxels whose HU (undoing ``window``) lies in ``blood_hu`` are blood; the largest connected
    blob is the haematoma. Returns its ``volume_ml`` (voxels x ``voxel_ml``), the ``side`` of its
    centroid (W runs from the patient's right to left), the ``level`` (third of the slices,
    D inferior -> superior) and ``near_midline`` (a blood voxel within ``midline_band`` of the
    width from the central column). Without skull stripping, partial-volume bone edges pass as blood.
    """
    lo, hi = window
    hu = lo + ct[0].detach().float().cpu().numpy() * (hi - lo)
    labels, n = ndimage.label((hu >= blood_hu[0]) & (hu <= blood_hu[1]))
    if n == 0:
        return {"volume_ml": 0.0, "side": None, "level": None, "near_midline": False}
    sizes = np.bincount(labels.ravel())[1:]
    blob = labels == 1 + int(np.argmax(sizes))
    z, _, x = (idx.astype(float) for idx in np.nonzero(blob))
    depth, width = hu.shape[0], hu.shape[2]
    centre = (width - 1) / 2
    return {
        "volume_ml": float(blob.sum() * voxel_ml),
        "side": "right" if x.mean() < centre else "left",
        "level": _CHOICES["level"][min(int(3 * (z.mean() + 0.5) / depth), 2)],
        "near_midline": bool((np.abs(x - centre) <= midline_band * width).any()),
    }


def measure_ct_file(path: str) -> dict:
    """:func:`measure_ct` of a CT file at its own resolution: skull-stripped, in the paper's window,
    voxels in (slice, row, column) order with columns running from the patient's right to left
    (RAS x, the patient's left to right, reversed)."""
    hu, affine = load_ct(path)
    lo, hi = PAPER_WINDOW
    windowed = np.where(brain_mask(hu), np.clip((hu - lo) / (hi - lo), 0.0, 1.0), 0.0)
    ct = torch.from_numpy(np.ascontiguousarray(windowed[::-1].transpose(2, 1, 0)))[None]
    return measure_ct(ct, abs(np.linalg.det(affine[:3, :3])) / 1000, (lo, hi))


def image_report(measurements: dict) -> str:
    """Deterministic semi-structured text from :func:`measure_ct`'s measurements.

    VDAFM has a language model write this text from the image; no language model is available
    offline, so a fixed template writes it from the image-derived measurements instead.
    """
    volume = measurements["volume_ml"]
    if volume <= 0:
        return _NO_BLOOD
    reach = _CHOICES["reach"][0 if measurements["near_midline"] else 1]
    return _REPORT.format(volume=_CHOICES["volume"][0] if volume < 1 else f"{volume:.0f}",
                          side=measurements["side"], level=measurements["level"], reach=reach)


def template_tokens(texts: list[str], max_tokens: int = TEMPLATE_MAX_TOKENS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) in :data:`TEMPLATE_VOCAB` (one token per word, mark or digit) and the mask."""
    index = {token: i for i, token in enumerate(TEMPLATE_VOCAB)}
    rows = [[index.get(t, 1) for t in _TOKEN.findall(text.lower())][:max_tokens] for text in texts]
    length = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids != 0).long()
