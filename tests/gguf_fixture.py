"""GGUF files of the tiny official checkpoints, written in the tests with the `gguf` package (docs/llama_cpp.md 4.3):
the names, shapes and transforms llama.cpp's rwkv6/rwkv7 loaders want, from BlinkDL's `.pth` keys. Written
independently of rwkv_state_hub/llama_cpp.py (which maps GGUF names back), so a wrong transform on either side
shows up as a fingerprint or a logits mismatch.

`dtype`: "f32" (every tensor F32), "f16", "bf16" or "q8_0" (the big matrices in that type, the rest F32, as llama.cpp's
own converter and quantizer leave them).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

CONTEXT_LENGTH = 1048576  # what convert_hf_to_gguf.py writes for RWKV
# the matrices llama.cpp's converter and quantizer store in the file's type; vectors and LoRA maps stay F32
BIG_MATRICES = re.compile(r"^(token_embd|output|blk\.\d+\.(time_mix_(receptance|key|value|gate|output)|"
                          r"channel_mix_(key|value|receptance)))\.weight$")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16


def _vec(t: torch.Tensor) -> np.ndarray:
    return t.float().reshape(-1).numpy()


def _mat(t: torch.Tensor) -> np.ndarray:
    return t.float().contiguous().numpy()


def _t(t: torch.Tensor) -> np.ndarray:
    """A LoRA matrix transposed: the official (in, out) to ggml's (out, in) rows."""
    return t.float().T.contiguous().numpy()


def _v7_block(sd: dict[str, torch.Tensor], i: int, C: int) -> dict[str, np.ndarray]:
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    lora = {n: (sd[f"{a}{n}1"], sd[f"{a}{n}2"]) for n in "wag"}
    v0, v1, v2 = (sd[f"{a}a0"], sd[f"{a}a1"], sd[f"{a}a2"]) if i == 0 else (sd[f"{a}v0"], sd[f"{a}v1"], sd[f"{a}v2"])
    lora["v"] = (v1, v2)  # layer 0 has no value residual: llama.cpp still loads (and ignores) a copy of a's
    out = {
        "time_mix_lerp_fused": torch.stack([sd[f"{a}x_{x}"].float().reshape(1, 1, C) for x in "rwkvag"]).numpy(),
        "time_mix_w0": _vec(sd[f"{a}w0"]), "time_mix_a0": _vec(sd[f"{a}a0"]), "time_mix_v0": _vec(v0),
        "time_mix_k_k": _vec(sd[f"{a}k_k"]), "time_mix_k_a": _vec(sd[f"{a}k_a"]), "time_mix_r_k": _vec(sd[f"{a}r_k"]),
        "time_mix_ln": _vec(sd[f"{a}ln_x.weight"]), "time_mix_ln.bias": _vec(sd[f"{a}ln_x.bias"]),
        "channel_mix_lerp_k": _vec(sd[f"{f}x_k"]),
        "channel_mix_key": _mat(sd[f"{f}key.weight"]), "channel_mix_value": _mat(sd[f"{f}value.weight"]),
    }
    for n, (m1, m2) in lora.items():
        out[f"time_mix_{n}1"], out[f"time_mix_{n}2"] = _t(m1), _t(m2)
    for name in ("receptance", "key", "value", "output"):
        out[f"time_mix_{name}"] = _mat(sd[f"{a}{name}.weight"])
    return out


def _v6_block(sd: dict[str, torch.Tensor], i: int, C: int) -> dict[str, np.ndarray]:
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    out = {
        "time_mix_lerp_x": _vec(sd[f"{a}time_maa_x"]),
        "time_mix_lerp_fused": torch.stack([sd[f"{a}time_maa_{x}"].float().reshape(1, 1, C) for x in "wkvrg"]).numpy(),
        "time_mix_w1": _t(sd[f"{a}time_maa_w1"]),
        "time_mix_w2": sd[f"{a}time_maa_w2"].float().permute(0, 2, 1).contiguous().numpy(),
        "time_mix_first": _mat(sd[f"{a}time_faaaa"]),
        "time_mix_decay": _vec(sd[f"{a}time_decay"]),
        "time_mix_decay_w1": _t(sd[f"{a}time_decay_w1"]), "time_mix_decay_w2": _t(sd[f"{a}time_decay_w2"]),
        "time_mix_ln": _vec(sd[f"{a}ln_x.weight"]), "time_mix_ln.bias": _vec(sd[f"{a}ln_x.bias"]),
        "channel_mix_lerp_k": _vec(sd[f"{f}time_maa_k"]), "channel_mix_lerp_r": _vec(sd[f"{f}time_maa_r"]),
        "channel_mix_key": _mat(sd[f"{f}key.weight"]), "channel_mix_value": _mat(sd[f"{f}value.weight"]),
        "channel_mix_receptance": _mat(sd[f"{f}receptance.weight"]),
    }
    for name in ("receptance", "key", "value", "gate", "output"):
        out[f"time_mix_{name}"] = _mat(sd[f"{a}{name}.weight"])
    return out


def gguf_tensors(sd: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """Every tensor under its GGUF name, as float32 numpy arrays in the shapes llama.cpp loads."""
    C = sd["emb.weight"].shape[1]
    out = {
        "token_embd.weight": _mat(sd["emb.weight"]), "output.weight": _mat(sd["head.weight"]),
    }
    for ours, theirs in (("blocks.0.ln0", "token_embd_norm"), ("ln_out", "output_norm")):
        out |= {f"{theirs}.{p}": _vec(sd[f"{ours}.{p}"]) for p in ("weight", "bias")}
    block = _v7_block if arch == "rwkv7" else _v6_block
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_layer):
        out[f"blk.{i}.attn_norm.weight"], out[f"blk.{i}.attn_norm.bias"] = (_vec(sd[f"blocks.{i}.ln1.{p}"])
                                                                          for p in ("weight", "bias"))
        out[f"blk.{i}.attn_norm_2.weight"], out[f"blk.{i}.attn_norm_2.bias"] = (_vec(sd[f"blocks.{i}.ln2.{p}"])
                                                                              for p in ("weight", "bias"))
        for name, t in block(sd, i, C).items():
            out[f"blk.{i}.{name}" + ("" if name.endswith(".bias") else ".weight")] = t
    return out


def _hyperparameters(w, sd: dict[str, torch.Tensor], arch: str) -> None:
    vocab, C = sd["emb.weight"].shape
    head_key = "blocks.0.att.r_k" if arch == "rwkv7" else "blocks.0.att.time_faaaa"
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(C)
    w.add_block_count(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")))
    w.add_feed_forward_length(sd["blocks.0.ffn.key.weight"].shape[0])
    w.add_head_count(0)
    w.add_layer_norm_eps(1e-5)
    w.add_wkv_head_size(sd[head_key].shape[1])
    w.add_token_shift_count(2)
    if arch == "rwkv7":
        w.add_decay_lora_rank(sd["blocks.0.att.w1"].shape[1])
        w.add_iclr_lora_rank(sd["blocks.0.att.a1"].shape[1])
        w.add_value_residual_mix_lora_rank(sd["blocks.1.att.v1"].shape[1])
        w.add_gate_lora_rank(sd["blocks.0.att.g1"].shape[1])
    else:
        w.add_time_mix_extra_dim(sd["blocks.0.att.time_maa_w1"].shape[1] // 5)
        w.add_time_decay_extra_dim(sd["blocks.0.att.time_decay_w1"].shape[1])
        w.add_rescale_every_n_layers(0)
    w.add_tokenizer_model("rwkv")
    # byte i as Python escapes it (b'\n' -> "\\n"): llama.cpp's RWKV tokenizer un-escapes the same way
    w.add_token_list([repr(bytes([i]))[2:-1].encode() for i in range(vocab)])
    w.add_token_types([1] * vocab)


def _encode(name: str, t: np.ndarray, dtype: str):
    """(data, raw_dtype) for the writer: the big matrices in `dtype`, everything else F32."""
    import gguf

    if dtype == "f32" or not BIG_MATRICES.match(name):
        return t.astype(np.float32), None
    if dtype == "f16":
        return t.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.Q8_0 if dtype == "q8_0" else gguf.GGMLQuantizationType.BF16
    return gguf.quants.quantize(t.astype(np.float32), kind), kind


def write_gguf(pth: str | Path, out: str | Path, dtype: str = "f32",
               change: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF of the official checkpoint `pth` (v6 or v7), as llama.cpp loads it. `change` replaces tensors by
    GGUF name (a model with other weights, for the identity checks)."""
    import gguf

    sd = torch.load(pth, map_location="cpu", weights_only=True)
    arch = "rwkv7" if "blocks.0.att.r_k" in sd else "rwkv6"
    w = gguf.GGUFWriter(str(out), arch)
    _hyperparameters(w, sd, arch)
    w.add_file_type(FILE_TYPES[dtype])
    for name, t in (gguf_tensors(sd, arch) | (change or {})).items():
        data, raw = _encode(name, t, dtype)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)
