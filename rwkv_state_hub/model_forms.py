"""The other files the same RWKV weights come in, mapped back to BlinkDL's official names and layouts, so that
everything downstream (the model, the spec, the fingerprint) sees one form. docs/model_forms.md has the sources.

- official: BlinkDL's `.pth` keys, in a `.pth` or a safetensors file, any float dtype;
- web-rwkv / Ai00 `.st` (its converter `convert_safetensors.py`): every tensor F16, `time_faaaa` renamed
  `time_first`, v6's `time_maa` renamed `time_mix`, and the low-rank matrices (and a merged time_state) with their
  last two dimensions swapped;
- Hugging Face RWKV-7 (fla-hub / `RWKV/` repos, fla's `convert_from_rwkv7.py`): `model.layers.N.attn.*` names, the
  low-rank matrices transposed, `w0/a0/v0` as LoRA biases, some vectors squeezed, layer 0's unused v0/v1/v2 dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import InvalidCheckpointError

# web-rwkv's converter swaps the last two dims of a key containing the first of these (its list, in its order)
_ST_TRANSPOSED = ("time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2", "w1", "w2", "a1", "a2", "g1",
                  "g2", "v1", "v2", "time_state", "lora.0")

_HF_LAYER = r"model\.layers\.(\d+)\."
# Hugging Face RWKV-7 name -> official name, and whether the tensor's last two dims were swapped
_HF_V7: list[tuple[re.Pattern, str, bool]] = [(re.compile(p), official, t) for p, official, t in [
    (r"model\.embeddings\.weight", "emb.weight", False),
    (r"lm_head\.weight", "head.weight", False),
    (r"model\.norm\.(weight|bias)", r"ln_out.\1", False),
    (_HF_LAYER + r"pre_norm\.(weight|bias)", r"blocks.\1.ln0.\2", False),
    (_HF_LAYER + r"attn_norm\.(weight|bias)", r"blocks.\1.ln1.\2", False),
    (_HF_LAYER + r"ffn_norm\.(weight|bias)", r"blocks.\1.ln2.\2", False),
    (_HF_LAYER + r"attn\.r_proj\.weight", r"blocks.\1.att.receptance.weight", False),
    (_HF_LAYER + r"attn\.k_proj\.weight", r"blocks.\1.att.key.weight", False),
    (_HF_LAYER + r"attn\.v_proj\.weight", r"blocks.\1.att.value.weight", False),
    (_HF_LAYER + r"attn\.o_proj\.weight", r"blocks.\1.att.output.weight", False),
    (_HF_LAYER + r"attn\.g_norm\.(weight|bias)", r"blocks.\1.att.ln_x.\2", False),
    (_HF_LAYER + r"attn\.([wavg])_lora\.lora\.0\.weight", r"blocks.\1.att.\g<2>1", True),
    (_HF_LAYER + r"attn\.([wavg])_lora\.lora\.2\.weight", r"blocks.\1.att.\g<2>2", True),
    (_HF_LAYER + r"attn\.([wav])_lora\.lora\.2\.bias", r"blocks.\1.att.\g<2>0", False),
    (_HF_LAYER + r"attn\.(x_[rwkvag]|k_k|k_a|r_k)", r"blocks.\1.att.\2", False),
    (_HF_LAYER + r"ffn\.(x_k|key\.weight|value\.weight)", r"blocks.\1.ffn.\2", False),
]]


def detect_form(path: Path, sd: dict[str, torch.Tensor]) -> str:
    """"official", "web-rwkv" or "hf": from the names, and for a v7 `.st` (whose names are the official ones)
    from the file's extension or, where they are not square, the low-rank matrices' shapes."""
    if "model.embeddings.weight" in sd or "lm_head.weight" in sd:
        return "hf"
    if any(k.endswith(".att.time_first") for k in sd) or path.suffix == ".st":
        return "web-rwkv"
    w1, emb = sd.get("blocks.0.att.w1"), sd.get("emb.weight")
    if w1 is not None and emb is not None and w1.dim() == 2 and w1.shape[1] == emb.shape[1] != w1.shape[0]:
        return "web-rwkv"  # [D, C]: a v7 .st renamed to .safetensors
    return "official"


def to_official(sd: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of any supported form under their official names and layouts (the official form as it is)."""
    form = detect_form(Path(path), sd)
    if form == "web-rwkv":
        return _from_web_rwkv(sd)
    if form == "hf":
        return _from_hf_v7(sd, str(path))
    return sd


def _from_web_rwkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    v6 = "blocks.0.att.time_mix_w1" in sd  # v5.2 has time_mix_k natively; v6's came from time_maa_k
    out = {}
    for key, t in sd.items():
        if any(name in key for name in _ST_TRANSPOSED) and t.dim() >= 2:
            t = t.transpose(-1, -2)
        name = key.replace(".time_first", ".time_faaaa")
        out[name.replace(".time_mix_", ".time_maa_") if v6 else name] = t
    return out


def _from_hf_v7(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in sd.items():
        for pattern, official, transposed in _HF_V7:
            m = pattern.fullmatch(key)
            if m:
                out[m.expand(official)] = t.transpose(-1, -2) if transposed else t
                break
        else:
            raise InvalidCheckpointError(f"{where}: {key[:80]!r} is not a tensor of a Hugging Face RWKV-7 model "
                                         "(fla-hub layout)")
    return out


def hf_weights_file(folder: Path) -> Path:
    """A Hugging Face model folder's weights: one `model.safetensors` (sharded checkpoints are not read yet)."""
    path = folder / "model.safetensors"
    if not path.is_file() and (folder / "model.safetensors.index.json").is_file():
        raise InvalidCheckpointError(f"{folder}: a sharded checkpoint (model.safetensors.index.json); sharded "
                                     "models are not read yet: save it as one model.safetensors")
    if not path.is_file():
        raise InvalidCheckpointError(f"{folder}: a folder without model.safetensors; name the model file itself")
    return path
