"""A loss-curve PNG drawn with Pillow alone (no plotting library to install)."""

from __future__ import annotations

import os

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
