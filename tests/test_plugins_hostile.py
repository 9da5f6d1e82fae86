"""The consumers' own files as we find them on disk: a broken Runner config or manifest never stops an install,
and a malformed Ai00 config gets one line."""

from __future__ import annotations

import pytest

from rwkv_state_hub.errors import StateHubError
from rwkv_state_hub.plugins.ai00.ai00 import model_folder, read_config
from rwkv_state_hub.plugins.rwkv_runner.runner import DEFAULT_MODELS_FOLDER, manifest_sha256, models_folder

BROKEN_JSON = ["[" * 200_000, '{"settings": [1, 2]}', '{"settings": {"customModelsPath": 5}}', "[]", "\xff",
               '{"models": 5}', '{"models": {"a": 1}}', '{"models": [5, "x", {"SHA256": 1}]}']


@pytest.mark.parametrize("text", BROKEN_JSON)
def test_runner_files_that_make_no_sense_are_ignored(tmp_path, text):
    (tmp_path / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    (tmp_path / "manifest.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    assert models_folder(tmp_path) == tmp_path / DEFAULT_MODELS_FOLDER
    assert manifest_sha256(tmp_path) == {}


@pytest.mark.parametrize("text", ["model = 5", "[model]\npath = 5", "model = [1, 2]", "a = " + "[" * 100_000])
def test_an_ai00_config_without_a_model_path_is_one_line(tmp_path, text):
    cfg = tmp_path / "Config.toml"
    cfg.write_text(text)
    with pytest.raises(StateHubError) as e:
        model_folder(tmp_path, read_config(cfg))
    assert "\n" not in str(e.value)
