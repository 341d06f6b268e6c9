"""Preprocessing as notebook 02 shows it: each step's effect on one CT (:func:`ichpro.data.preprocess_steps`)
and the model input under two HU windows."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ichpro.config import BRAIN_WINDOW, PreprocessConfig
from ichpro.data import preprocess_steps, preprocess_transforms, windowed
from ichpro.errors import IchproError
from ichpro.explain import brain_of
from ichpro.image_report import BLOOD_HU
from ichpro.plots import show_axial

#: the steps whose output the step figure shows
SHOWN_STEPS = ("orient_ras", "skull_strip", "crop_to_brain", "window", "resize")


class Snapshot(NamedTuple):
    """A step's CT: ``image`` in HU on RAS axes (x, y, z), or in window units after the ``window`` step,
    on the model axes (D, H, W) after ``to_model_axes``."""

    image: np.ndarray
    windowed: bool
    model_axes: bool

    def units(self, hu_range: tuple[float, float], hu_window: tuple[float, float]) -> tuple[float, float]:
        """A HU range in this snapshot's units (``hu_window``: the window the ``window`` step applies)."""
        low, high = windowed(hu_range, hu_window) if self.windowed else hu_range
        return float(low), float(high)


def blood_slice(volume: np.ndarray | torch.Tensor, band: tuple[float, float], axis: int) -> int:
    """Index along ``axis`` of the slice with the most voxels strictly inside ``band`` (the blood range)."""
    volume = np.asarray(volume)
    inside = (volume > band[0]) & (volume < band[1])
    return int(np.argmax(inside.sum(axis=tuple(a for a in range(volume.ndim) if a != axis))))


def step_by_step(ct_path: str | Path, cfg: PreprocessConfig, shown: tuple[str, ...] = SHOWN_STEPS
                 ) -> tuple[pd.DataFrame, dict[str, Snapshot]]:
    """Run the preprocessing steps one at a time on a CT: a table of each step's output (shape, range,
    milliseconds) and a :class:`Snapshot` of each ``shown`` step's CT."""
    steps = preprocess_steps(cfg)
    unknown = [name for name in shown if name not in steps]
    if unknown:
        raise IchproError(f"no preprocessing step {unknown[0]!r} with this config; "
                          f"its steps are {', '.join(steps)}")
    data, rows, snapshots = {"ct": str(ct_path)}, [], {}
    names = list(steps)
    for name, step in steps.items():
        start = time.perf_counter()
        data = step(data)
        image = data["ct"]
        rows.append({"step": name, "shape": tuple(image.shape), "min": float(image.min()),
                     "max": float(image.max()), "ms": 1000 * (time.perf_counter() - start)})
        if name in shown:
            done = names[:names.index(name) + 1]
            snapshots[name] = Snapshot(np.asarray(image[0]).copy(), "window" in done, "to_model_axes" in done)
    return pd.DataFrame(rows), snapshots


def plot_steps(snapshots: dict[str, Snapshot], hu_window: tuple[float, float], title: str = "") -> plt.Figure:
    """Each snapshot's axial slice with the most blood-range voxels (:data:`ichpro.image_report.BLOOD_HU`),
    as a radiology viewer shows it, all in the brain window (after windowing: its image under
    ``hu_window``, the profile's window)."""
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3.2 * len(snapshots), 3.6), squeeze=False)
    for ax, (name, snap) in zip(axes[0], snapshots.items()):
        shown, band = snap.units(BRAIN_WINDOW, hu_window), snap.units(BLOOD_HU, hu_window)
        if snap.model_axes:  # (D, H, W): row 0 is the front of the head, column 0 the patient's right
            k = blood_slice(snap.image, band, axis=0)
            ax.imshow(snap.image[k], cmap="gray", vmin=shown[0], vmax=shown[1])
            ax.set_title(f"{name}: model input slice {k}", fontsize=9)
            ax.axis("off")
        else:
            show_axial(ax, snap.image, blood_slice(snap.image, band, axis=2), window=shown,
                       title=f"{name} {snap.image.shape}")
    fig.suptitle(title)
    return fig


def plot_windows(ct_path: str | Path, mask_path: str | Path, cfg: PreprocessConfig,
                 windows: dict[str, tuple[float, float]]) -> plt.Figure:
    """The model input under each HU window, on the slice with the most blood (from the mask), in the full
    [0, 1] range; each title gives the mean intensity of the blood and of the rest of the brain."""
    fig, axes = plt.subplots(1, len(windows), figsize=(3.6 * len(windows), 3.9), squeeze=False)
    for ax, (label, window) in zip(axes[0], windows.items()):
        pipeline = preprocess_transforms(replace(cfg, hu_window=window), with_blood=True)
        data = pipeline({"ct": str(ct_path), "blood": str(mask_path)})
        x, blood = data["ct"][0].numpy(), data["blood"].sum(0).numpy() >= 0.5
        k = int(np.argmax(blood.sum(axis=(1, 2))))
        ax.imshow(x[k], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{label}: slice {k}\nmean: blood {x[blood].mean():.2f}, "
                     f"rest of the brain {x[brain_of(x) & ~blood].mean():.2f}", fontsize=9)
        ax.axis("off")
    return fig
