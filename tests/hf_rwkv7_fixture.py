"""A Hugging Face RWKV-7 model folder written as fla's `convert_from_rwkv7.py` writes it (docs/model_forms.md,
section 3.1), for test fixtures: kept apart from rwkv_state_hub.model_forms, which reads such files back, so the
fixture does not share the reader's mistakes."""

from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import torch


def as_hf_rwkv7(sd: dict[str, torch.Tensor], folder: Path) -> Path:
    """fla's convert_from_rwkv7.py: the fla-hub names, low-rank matrices transposed, w0/a0/v0 as LoRA biases,
    k_k / k_a / ffn.x_k squeezed, layer 0's v0/v1/v2 dropped; saved as model.safetensors in a folder."""
    out = {"model.embeddings.weight": sd["emb.weight"], "lm_head.weight": sd["head.weight"],
           "model.norm.weight": sd["ln_out.weight"], "model.norm.bias": sd["ln_out.bias"]}
    renames = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att.receptance.weight": "attn.r_proj.weight",
               "att.key.weight": "attn.k_proj.weight", "att.value.weight": "attn.v_proj.weight",
               "att.output.weight": "attn.o_proj.weight", "att.ln_x": "attn.g_norm"}
    for key, t in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if not m:
            continue
        i, rest = m.groups()
        lora = re.fullmatch(r"att\.([wavg])([012])", rest)
        if lora and i == "0" and lora.group(1) == "v":
            continue  # dropped: layer 0 has no value residual
        if lora:
            name, part = lora.groups()
            key_hf = f"attn.{name}_lora.lora.{'0.weight' if part == '1' else '2.weight' if part == '2' else '2.bias'}"
            t = t.reshape(-1) if part == "0" else t.t()
        else:
            key_hf = next((rest.replace(a, b, 1) for a, b in renames.items() if rest.startswith(a)),
                          rest.replace("att.", "attn.", 1))
            t = t.reshape(-1) if rest in ("att.k_k", "att.k_a", "ffn.x_k") else t
        out[f"model.layers.{i}.{key_hf}"] = t.contiguous()
    folder.mkdir()
    safetensors.torch.save_file(out, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "rwkv7"}')
    return folder
