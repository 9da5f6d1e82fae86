"""Print the table of issue 18: every real model (../shared/models and the bundled ones) in every file form its
weights come in, and for each: the weights fingerprint against the official bf16 file's, the logits against the
official file's, what a state trained on the official file says when it meets that form, and what it says when
it meets the same form of a fine-tuned copy (one tensor changed by 5%).

    .venv/bin/python scripts/forms_table.py

The .st and Hugging Face copies are made with the tests' converters (tests/web_rwkv_fixture.py,
tests/hf_rwkv7_fixture.py), written from web-rwkv's and fla's converter sources.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hf_rwkv7_fixture import as_hf_rwkv7  # noqa: E402
from web_rwkv_fixture import as_web_rwkv  # noqa: E402

from rwkv_state_hub import RWKV, ModelMismatchError, State, read_spec  # noqa: E402
from rwkv_state_hub.examples import example_model  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
MODELS = {"tiny-rwkv-5v2-730K": "v5.2", "tiny-rwkv-6v0-1m": "v6", "tiny-rwkv-7v0-834K": "v7",
          "rwkv7-example-L4-D256": "v7"}
TOKENS = torch.tensor([list(b"WEATHER. Oslo: light rain")])


def _save(dtype: torch.dtype, suffix: str) -> Callable[[dict, Path], Path]:
    def write(sd: dict, folder: Path) -> Path:
        sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
        path = folder / f"model{suffix}"
        (safetensors.torch.save_file if suffix == ".safetensors" else torch.save)(sd, path)
        return path
    return write


FORMS: dict[str, Callable[[dict, Path], Path]] = {
    ".pth bf16 (official)": _save(torch.bfloat16, ".pth"),
    ".pth fp16": _save(torch.float16, ".pth"),
    ".pth fp32": _save(torch.float32, ".pth"),
    "safetensors fp16": _save(torch.float16, ".safetensors"),
    "web-rwkv/Ai00 .st": lambda sd, folder: as_web_rwkv(sd, folder / "model.st"),
    "Hugging Face (fla-hub)": lambda sd, folder: as_hf_rwkv7(sd, folder / "hf"),
}


def _master(name: str) -> dict[str, torch.Tensor] | None:
    path = SHARED / f"{name}.pth" if name.startswith("tiny-rwkv-6") else example_model(f"{name}.pth")
    if not path.exists():
        return None
    return {k: v.to(torch.bfloat16) for k, v in torch.load(path, weights_only=True).items()}


def _verdict(state: State, path: Path) -> str:
    spec = read_spec(path)
    try:
        state.check(spec)
    except ModelMismatchError:
        return "refused"
    return f"accepted ({state.identity(spec)})"


def _row(name: str, form: str, master: dict, tuned: dict, official: Path, tmp: Path) -> list[str]:
    copy, tuned_copy = (FORMS[form](sd, tmp / label) for sd, label in ((master, "copy"), (tuned, "tuned")))
    same_fp = read_spec(copy).fingerprint == read_spec(official).fingerprint
    with torch.no_grad():
        want = RWKV.from_pretrained(official, dtype=torch.float32)(TOKENS)[0]
        got = RWKV.from_pretrained(copy, dtype=torch.float32)(TOKENS)[0]
    rel = float((got - want).abs().max() / want.abs().max())
    state = State.zeros(read_spec(official))
    return [name, form, "equal" if same_fp else "DIFFERENT", f"{rel:.1e}", _verdict(state, copy),
            _verdict(state, tuned_copy)]


def main() -> None:
    header = ["model", "form", "fingerprint vs official", "max |logit diff| / max |logit|", "state of official",
              "fine-tuned copy"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for name, arch in MODELS.items():
        master = _master(name)
        if master is None:
            print(f"| {name} | (not found: ../shared/models is absent) |")
            continue
        key = next(k for k in master if k.endswith("att.key.weight"))
        tuned = dict(master, **{key: master[key] * 1.05})
        with tempfile.TemporaryDirectory() as tmp:
            for form in FORMS:
                if form.startswith("Hugging Face") and arch != "v7":
                    continue  # the fla-hub layout is RWKV-7's
                folder = Path(tmp) / str(abs(hash(form)))
                for sub in ("official", "copy", "tuned"):
                    (folder / sub).mkdir(parents=True)
                official = FORMS[".pth bf16 (official)"](master, folder / "official")
                print("| " + " | ".join(_row(name, form, master, tuned, official, folder)) + " |", flush=True)


if __name__ == "__main__":
    main()
