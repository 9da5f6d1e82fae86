"""A web-rwkv / Ai00 `.st` model written as web-rwkv's `convert_safetensors.py` writes it (docs/model_forms.md,
section 2.2), for test fixtures: the real converter needs packages and networks these machines do not have."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

# the converter swaps the last two dims of a key containing any of these (its list, kept here independently of
# rwkv_state_hub.model_forms, which reads such files back: the fixture must not share the reader's mistakes)
ST_TRANSPOSED = ("time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2", "w1", "w2", "a1", "a2", "g1", "g2",
                 "v1", "v2", "time_state", "lora.0")


def as_web_rwkv(sd: dict[str, torch.Tensor], out: Path, pth_sha: str | None = None) -> Path:
    """Rename (time_faaaa -> time_first, time_maa -> time_mix), lower-case, F16, swap the low-rank ones;
    `pth_sha`: the source's SHA-1 in the metadata, as Ai00's old convert_ai00.py meant to record it."""
    converted = {}
    for key, t in sd.items():
        name = key.replace("time_faaaa", "time_first").replace("time_maa", "time_mix").lower()
        t = t.half()
        if any(x in name for x in ST_TRANSPOSED):
            t = t.transpose(-1, -2)
        converted[name] = t.contiguous()
    metadata = {"format": "pt", **({"pth_SHA": pth_sha} if pth_sha else {})}
    safetensors.torch.save_file(converted, out, metadata=metadata)
    return out
