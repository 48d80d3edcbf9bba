"""A tiny random-weight Llama model, built locally and deterministically, for tests and demos.

The fabric's integration tests and demos need a real Hugging Face model directory that vLLM
(and ``transformers``) can serve: a config, safetensors weights, a tokenizer with a chat
template and a generation config. Downloading one needs hub access and makes tests depend
on the network, so this module builds one from nothing:

* ``LlamaForCausalLM`` with 4 layers, hidden 256, 4 query heads and 2 KV heads of
  ``head_dim`` 64 (grouped-query attention, so KV-cache layouts are not the trivial case),
  a 2048-token vocabulary and bfloat16 weights drawn from a fixed seed. The standard
  deviations were tuned: with ``initializer_range=0.02`` everywhere the residual stream is
  dominated by near-uniform attention averages and greedy decoding repeats a token or two;
  with embeddings at std 1.0 and every projection at 0.04, continuations are varied, differ
  between prompts and depend on the whole context (so a corrupted KV cache changes them),
  while the network stays calm enough that bfloat16 rounding differences between
  implementations (vLLM vs ``transformers``) rarely flip a greedy choice. Larger projection
  stds make the network chaotic and such flips common (logit near-ties cannot be ruled out
  for any random model, so compare implementations with a tie tolerance).
* A byte-level BPE tokenizer trained with ``tokenizers`` on a corpus generated from a
  seeded word list, saved as a ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<unk>``/
  ``<pad>``, role tokens and a small jinja chat template (so ``/v1/chat/completions`` works).

Builds are cached: the directory is named after a digest of the whole recipe
(``<cache_root>/tiny-llama-<digest12>``), is assembled in a temporary directory next to its
destination and moved into place with one ``os.replace``, and carries a marker file that is
written last, so concurrent builders never see half a model. Two builds give byte-identical
weights. Run ``python -m pdfabric.testing.tinymodel [--dest DIR]`` to build and print the path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "MARKER",
    "RECIPE_VERSION",
    "build_tiny_llama",
    "default_cache_root",
    "main",
    "recipe",
    "recipe_digest",
]

RECIPE_VERSION = 1
MARKER = ".pdfabric-tinymodel.json"
"""Written last into a finished build; holds the recipe and its digest."""

_MODEL: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
_WEIGHTS: dict[str, Any] = {"seed": 20240611, "embed_std": 1.0, "linear_std": 0.04, "lm_head_std": 0.25}
_CORPUS: dict[str, Any] = {"seed": 7, "made_up_words": 1500, "sentences": 6000}
_SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
_ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORD_TEXT = (
    "the of and to in is it that was for on are as with be at by this from or have not but"
    " what all were when we there can an your which their said if do will each about how up"
    " out them then she many some so these would other into has more her two like him see"
    " time could no make than first been its who now people my made over did down only way"
    " find use may water long little very after words called just where most know get through"
    " back much before go good new write our used me man too any day same right look think"
    " also around another came come work three word must because does part even place well"
    " such here take why things help put years different away again off went old number"
    " prefill decode cache block transfer layer token model server request memory stream"
)
_WORDS = tuple(_WORD_TEXT.split())
"""Real words for the corpus; made-up words from the syllables below fill the rest."""
_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "st", "tr", "pl", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "n", "r", "s", "t", "l", "nd", "ck")


def default_cache_root() -> Path:
    """Where built models are kept: ``$PDFABRIC_CACHE_DIR/models``, else ``~/.cache/pdfabric/models``.

    This is the only place the module reads the environment.
    """
    base = os.environ.get("PDFABRIC_CACHE_DIR") or Path.home() / ".cache" / "pdfabric"
    return Path(base) / "models"


def recipe() -> dict[str, Any]:
    """Everything that determines the build (a fresh copy); its digest names the cache directory."""
    return json.loads(json.dumps({
        "version": RECIPE_VERSION,
        "model": _MODEL,
        "weights": _WEIGHTS,
        "corpus": _CORPUS,
        "words": list(_WORDS),
        "syllables": [list(_ONSETS), list(_VOWELS), list(_CODAS)],
        "special": _SPECIAL,
        "roles": list(_ROLES),
        "chat_template": CHAT_TEMPLATE,
    }))


def recipe_digest() -> str:
    """First 12 hex digits of the SHA-256 of the canonical JSON of ``recipe()``."""
    text = json.dumps(recipe(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _corpus_lines() -> Iterator[str]:
    """Deterministic English-ish text: built-in and made-up words with a Zipf-like spread."""
    rng = random.Random(_CORPUS["seed"])
    made_up = {
        "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))
        for _ in range(_CORPUS["made_up_words"])
    }
    lexicon = list(_WORDS) + sorted(made_up - set(_WORDS))
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(lexicon))]
    for _ in range(_CORPUS["sentences"]):
        words = rng.choices(lexicon, weights, k=rng.randint(4, 16))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 4096)))
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] += ","
        yield words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".....?!:")


def _build_tokenizer(out: Path) -> Any:
    """Train a byte-level BPE on the corpus and save it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = [_SPECIAL["unk"], _SPECIAL["bos"], _SPECIAL["eos"], _SPECIAL["pad"], *_ROLES]
    tok = Tokenizer(models.BPE(unk_token=_SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_MODEL["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    if tok.get_vocab_size() != _MODEL["vocab_size"]:  # the corpus must be rich enough for every merge
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, the model {_MODEL['vocab_size']}")
    bos = _SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_SPECIAL["bos"],
        eos_token=_SPECIAL["eos"],
        unk_token=_SPECIAL["unk"],
        pad_token=_SPECIAL["pad"],
        extra_special_tokens=list(_ROLES),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=_MODEL["max_position_embeddings"],
    )
    wrapped.save_pretrained(out)
    # transformers 5 records its new class name, which transformers 4 readers do not know; the
    # old name loads the same tokenizer.json in both.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return wrapped


def _build_model(out: Path, tokenizer: Any) -> None:
    """Random bfloat16 ``LlamaForCausalLM`` weights from a fixed seed, saved as safetensors."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    spec = {k: v for k, v in _MODEL.items() if k != "rope_theta"}
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(_SPECIAL[k]) for k in ("bos", "eos", "pad")}
    config = LlamaConfig(
        **spec,
        **ids,
        rope_parameters={"rope_type": "default", "rope_theta": _MODEL["rope_theta"]},
        initializer_range=_WEIGHTS["linear_std"],
    )
    with torch.random.fork_rng(devices=[]):  # the default init is overwritten; keep the caller's RNG
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(_WEIGHTS["seed"])  # our own stream, in sorted-name order
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            kind = "embed" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head") else "linear"
            param.normal_(0.0, _WEIGHTS[f"{kind}_std"], generator=gen)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(**ids)
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" on stderr is noise here
    try:
        model.save_pretrained(out)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def _build_into(tmp: Path) -> None:
    """Write the whole model into ``tmp``, the marker last."""
    tokenizer = _build_tokenizer(tmp)
    _build_model(tmp, tokenizer)
    for path in tmp.iterdir():
        path.chmod(0o644)  # some writers create private files; the model is not secret
    marker = {"digest": recipe_digest(), "recipe": recipe()}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _is_complete(path: Path, digest: str) -> bool:
    """True when ``path`` holds a finished build of this recipe, False when it is absent or an
    empty directory (which the build replaces); raises ``FileExistsError`` for anything else."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return False
    try:
        if json.loads((path / MARKER).read_text()).get("digest") == digest:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    raise FileExistsError(f"{path} exists and is not a finished tiny-llama build of recipe {digest}")


def build_tiny_llama(dest: Path | None = None, *, cache_root: Path | None = None) -> Path:
    """Build the tiny Llama model directory (or reuse a finished one) and return its path.

    ``dest`` is the exact directory to build; by default it is
    ``<cache_root>/tiny-llama-<digest12>`` with ``cache_root`` defaulting to
    ``default_cache_root()``. A finished build there is returned as it is. Otherwise the model
    is built in a temporary directory beside ``dest`` and renamed into place atomically;
    if another process finished first, its build is kept and ours discarded.
    """
    digest = recipe_digest()
    if dest is None:
        root = default_cache_root() if cache_root is None else Path(cache_root)
        dest = root / f"tiny-llama-{digest}"
    dest = Path(dest)
    if _is_complete(dest, digest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is not secret
        _build_into(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _is_complete(dest, digest):  # someone else's finished build is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the model and print its directory."""
    parser = argparse.ArgumentParser(
        prog="python -m pdfabric.testing.tinymodel", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--dest", type=Path, help="directory to build (default: tiny-llama-<digest> in the cache)")
    parser.add_argument("--cache-root", type=Path, help="cache root (default: $PDFABRIC_CACHE_DIR/models)")
    args = parser.parse_args(argv)
    print(build_tiny_llama(args.dest, cache_root=args.cache_root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
