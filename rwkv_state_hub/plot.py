"""Every picture we draw, with Pillow alone (no plotting library to install): the loss curve of a run, and the
[layers, heads] heatmaps of `rwkv-state diff --png` and the demo's inspector."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from .files import atomic_write

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 800, 450, 70, 20, 40, 50
TRAIN, VAL, AXIS, GRID = (40, 90, 200), (220, 90, 30), (40, 40, 40), (225, 225, 225)


def plot_losses(metrics: list[dict], path: str | os.PathLike, title: str = "state tuning") -> None:
    """Training loss per step (blue) and validation loss (orange dots) against the step."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD_L, 12), title, fill=AXIS)
    train = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    points = train + val
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)

        def xy(step: float, loss: float) -> tuple[float, float]:
            return (PAD_L + (step - x0) / (x1 - x0) * (W - PAD_L - PAD_R),
                    H - PAD_B - (loss - y0) / (y1 - y0) * (H - PAD_T - PAD_B))

        for i in range(5):  # horizontal grid with loss labels
            loss = y0 + (y1 - y0) * i / 4
            _, y = xy(x0, loss)
            d.line([(PAD_L, y), (W - PAD_R, y)], fill=GRID)
            d.text((8, y - 6), f"{loss:.3f}", fill=AXIS)
        for i in range(5):
            step = x0 + (x1 - x0) * i / 4
            x, _ = xy(step, y0)
            d.text((x - 10, H - PAD_B + 8), f"{step:.0f}", fill=AXIS)
        if len(train) > 1:
            d.line([xy(*p) for p in train], fill=TRAIN, width=2)
        for p in val:
            x, y = xy(*p)
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=VAL)
    d.line([(PAD_L, PAD_T), (PAD_L, H - PAD_B), (W - PAD_R, H - PAD_B)], fill=AXIS)
    d.text((W // 2 - 20, H - 20), "step", fill=AXIS)
    d.text((W - 220, 12), "train loss", fill=TRAIN)
    d.text((W - 120, 12), "val loss", fill=VAL)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


# ---------------------------------------------------------------- heatmaps: one value per layer and head

NONFINITE_GREY = (150, 150, 150)  # a head whose value is NaN or inf


@dataclass(frozen=True)
class ColourScale:
    """White at 0, `full` at `top` and above; top None: the largest finite value drawn."""

    full: tuple[int, int, int]
    name: str
    top: float | None = None

    def colour(self, value: float, top: float) -> tuple[int, int, int]:
        if not math.isfinite(value):
            return NONFINITE_GREY
        v = min(max(value / top, 0.0), 1.0)
        return tuple(round(255 - v * (255 - c)) for c in self.full)  # type: ignore[return-value]


DIFF_SCALE = ColourScale((165, 0, 0), "dark red", top=1.0)  # a relative difference: 1 = as different as can be
NORM_SCALE = ColourScale((0, 51, 145), "dark blue")  # norms: dark blue = the largest


def draw_heatmap(values: torch.Tensor, title: str, scale: ColourScale = DIFF_SCALE, width: int = 560,
                 height: int = 420) -> Image.Image:
    """A [layers, heads] table of non-negative values as a picture about `width` x `height`: layers down,
    heads across, NaN and inf in grey."""
    L, H = values.shape
    finite = values[torch.isfinite(values)]
    top = scale.top or (float(finite.max()) if finite.numel() else 0.0) or 1.0
    cell, row = max(4, min(40, (width - 50) // H)), max(4, min(22, height // L))
    left, top_y = 34, 50
    img = Image.new("RGB", (max(left + H * cell + 10, 460), top_y + L * row + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), title[:70], fill=AXIS)
    draw.text((left, 20), "layers down, heads across", fill=(90, 90, 90))
    clamped = "+" if scale.top is not None else ""
    draw.text((left, 34), f"white = 0, {scale.name} = {top:.4g}{clamped}, grey = NaN or inf", fill=(90, 90, 90))
    for i in range(L):
        if row >= 10 or i % 4 == 0:
            draw.text((6, top_y + i * row + max(0, row // 2 - 6)), str(i), fill=AXIS)
        for h in range(H):
            box = [left + h * cell, top_y + i * row, left + (h + 1) * cell - 1, top_y + (i + 1) * row - 1]
            draw.rectangle(box, fill=scale.colour(float(values[i, h]), top))
    return img


def save_heatmap(values: torch.Tensor, path: str | os.PathLike,
                 title: str = "relative difference of each head's state", scale: ColourScale = DIFF_SCALE) -> None:
    """draw_heatmap, written as a PNG (atomically: a reader never sees half a file)."""
    img = draw_heatmap(values, title, scale)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


# ---------------------------------------------------------------- grouped bars: a benchmark's table as a picture

SERIES = [(40, 90, 200), (220, 90, 30), (60, 160, 80), (150, 60, 170), (120, 120, 120)]


def _bar_panel(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
               groups: dict[str, list[float]]) -> None:
    """One chart inside `box` (left, top, right, bottom): a group of bars per key, one bar per series."""
    left, top, right, bottom = box
    d.text((left, top), title, fill=AXIS)
    x0, y0, x1, y1 = left + 50, top + 24, right - 10, bottom - 24
    peak = max((v for row in groups.values() for v in row), default=0.0) or 1.0
    for i in range(5):
        y = y1 - (y1 - y0) * i / 4
        d.line([(x0, y), (x1, y)], fill=GRID)
        d.text((left, y - 6), f"{peak * i / 4:.3g}", fill=AXIS)
    slot = (x1 - x0) / max(len(groups), 1)
    for g, (name, row) in enumerate(groups.items()):
        bar = slot * 0.8 / max(len(row), 1)
        for s, value in enumerate(row):
            bx = x0 + g * slot + slot * 0.1 + s * bar
            by = y1 - (y1 - y0) * value / peak
            d.rectangle([bx, by, bx + bar - 2, y1], fill=SERIES[s % len(SERIES)])
            d.text((bx, by - 12), f"{value:.3g}", fill=AXIS)
        d.text((x0 + g * slot + slot / 2 - 12, y1 + 6), name, fill=AXIS)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXIS)


def save_bar_charts(panels: list[tuple[str, dict[str, list[float]]]], series: list[str],
                    path: str | os.PathLike) -> None:
    """Charts side by side, each (title, {group: [one value per series]}), one legend for the series."""
    width = 520
    img = Image.new("RGB", (width * len(panels), H), "white")
    d = ImageDraw.Draw(img)
    for p, (title, groups) in enumerate(panels):
        _bar_panel(d, (p * width + 10, 10, (p + 1) * width - 10, H - 30), title, groups)
    for s, name in enumerate(series):
        x = 60 + s * 90
        d.rectangle([x, H - 20, x + 12, H - 8], fill=SERIES[s % len(SERIES)])
        d.text((x + 16, H - 20), name, fill=AXIS)
    atomic_write(path, lambda p: img.save(p, format="PNG"))
