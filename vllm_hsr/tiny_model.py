"""Build a tiny random-weight Llama model directory (with a locally trained tokenizer) for tests and benchmarks."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vllm_hsr.model_dir import build_atomically, write_json

MARKER_FILE = "vllm_hsr_tiny.json"
# Bump when the builder's output changes, so existing directories get rebuilt.
FORMAT_VERSION = 1
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
DTYPES = ("float32", "bfloat16", "float16")
# Head sizes accepted by vLLM's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes).
CPU_ATTN_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # byte-level alphabet plus special tokens
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Tokenizer training corpus: fixed-seed pseudo-English, independent of the weight seed.
CORPUS_SEED = 1234
CORPUS_SENTENCES = 8000
PSEUDO_WORDS = 2000
_ONSETS = (
    "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
    "br", "ch", "dr", "fl", "gr", "kr", "pl", "sh", "st", "th", "tr",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "m", "nd", "st", "th")
_WORDS: dict[str, tuple[str, ...]] = {
    "det": ("the", "a", "one", "every", "some", "that", "this", "each", "no", "my", "our", "their"),
    "adj": (
        "quick", "lazy", "bright", "dark", "small", "large", "quiet", "loud", "ancient", "modern",
        "green", "blue", "red", "golden", "silver", "happy", "careful", "strange", "simple", "heavy",
        "gentle", "brave", "clever", "empty", "distant", "warm", "cold", "narrow", "wide", "hidden",
    ),
    "noun": (
        "fox", "dog", "river", "mountain", "city", "garden", "teacher", "student", "machine", "window",
        "forest", "engine", "letter", "market", "bridge", "library", "kitchen", "planet", "signal", "village",
        "model", "memory", "cache", "token", "network", "kernel", "server", "question", "answer", "story",
        "morning", "evening", "winter", "summer", "ocean", "island", "road", "house", "door", "table",
    ),
    "verb": (
        "jumps over", "walks past", "looks at", "finds", "builds", "reads", "writes", "carries", "follows",
        "remembers", "opens", "closes", "watches", "paints", "measures", "explains", "visits", "repairs",
        "describes", "protects", "crosses", "sells", "borrows", "returns", "counts", "moves toward",
    ),
    "adv": (
        "slowly", "quickly", "quietly", "carefully", "often", "rarely", "today", "again", "together",
        "suddenly", "finally", "yesterday", "tomorrow", "silently", "happily", "never", "always",
    ),
    "prep": ("near", "under", "behind", "beside", "inside", "across", "beyond", "above", "within", "around"),
    "conj": ("and", "but", "while", "because", "although", "so", "when", "before", "after", "until"),
}


class _CorpusWriter:
    """Deterministic pseudo-English: a fixed word list plus invented words and names."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        invented: set[str] = set()
        while len(invented) < PSEUDO_WORDS:
            syllables = self.rng.randint(1, 3)
            invented.add("".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(syllables)
            ))
        self.invented = sorted(invented)

    def noun_phrase(self) -> str:
        rng = self.rng
        if rng.random() < 0.25:
            return rng.choice(self.invented).capitalize()
        words = [rng.choice(_WORDS["det"])]
        if rng.random() < 0.6:
            words.append(rng.choice(_WORDS["adj"]))
        words.append(rng.choice(self.invented if rng.random() < 0.4 else _WORDS["noun"]))
        return " ".join(words)

    def clause(self) -> str:
        rng = self.rng
        parts = [self.noun_phrase(), rng.choice(_WORDS["verb"]), self.noun_phrase()]
        if rng.random() < 0.4:
            parts += [rng.choice(_WORDS["prep"]), self.noun_phrase()]
        if rng.random() < 0.3:
            parts.append(rng.choice(_WORDS["adv"]))
        if rng.random() < 0.15:
            parts.append(f"at {rng.randint(1, 12)}:{rng.randint(0, 59):02d}")
        return " ".join(parts)

    def sentence(self) -> str:
        rng = self.rng
        text = self.clause()
        if rng.random() < 0.35:
            text += f", {rng.choice(_WORDS['conj'])} {self.clause()}"
        text = text[0].upper() + text[1:] + (rng.choice(".!?") if rng.random() < 0.2 else ".")
        return f'"{text}"' if rng.random() < 0.05 else text


def _corpus(num_sentences: int = CORPUS_SENTENCES, seed: int = CORPUS_SEED) -> Iterator[str]:
    """Yield the tokenizer training sentences."""
    writer = _CorpusWriter(seed)
    for _ in range(num_sentences):
        yield writer.sentence()


def _check_params(params: dict[str, Any]) -> None:
    """Raise ValueError naming the offending setting."""
    for name in (
        "layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
        "intermediate_size", "vocab_size", "max_position",
    ):
        if params[name] <= 0:
            raise ValueError(f"{name} must be positive, got {params[name]}")
    if params["hidden_size"] != params["num_heads"] * params["head_dim"]:
        raise ValueError(
            f"hidden_size ({params['hidden_size']}) must equal num_heads * head_dim "
            f"({params['num_heads']} * {params['head_dim']} = {params['num_heads'] * params['head_dim']})"
        )
    if params["num_heads"] % params["num_kv_heads"]:
        raise ValueError(
            f"num_heads ({params['num_heads']}) must be divisible by num_kv_heads ({params['num_kv_heads']})"
        )
    if params["head_dim"] % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {params['head_dim']}")
    if params["vocab_size"] < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {params['vocab_size']}")
    if params["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {params['dtype']!r}")


def _build_tokenizer(out_dir: Path, vocab_size: int, max_position: int) -> None:
    """Train a byte-level BPE tokenizer on the built-in corpus and save it.

    Ids the corpus cannot fill are padded with reserved special tokens (as Llama 3 does), so the
    tokenizer has exactly vocab_size entries and every id the model can emit decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    reserved = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(reserved)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected vocab_size {vocab_size}")
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_position,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(out_dir)
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    write_json(out_dir / "special_tokens_map.json", special_map)


def _build_model(out_dir: Path, params: dict[str, Any]) -> None:
    """Save a randomly initialised LlamaForCausalLM with config and generation config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    rope_theta = 10000.0
    config = LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["layers"],
        num_attention_heads=params["num_heads"],
        num_key_value_heads=params["num_kv_heads"],
        head_dim=params["head_dim"],
        max_position_embeddings=params["max_position"],
        rope_theta=rope_theta,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
    )
    torch.manual_seed(params["seed"])
    model = LlamaForCausalLM(config).to(getattr(torch, params["dtype"]))
    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    # Newer transformers only write `dtype` / `rope_parameters`; add the classic keys for older readers.
    config_path = out_dir / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json.update(architectures=["LlamaForCausalLM"], torch_dtype=params["dtype"], rope_theta=rope_theta)
    write_json(config_path, config_json)


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    layers: int = 2,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 512,
    vocab_size: int = 4096,
    max_position: int = 32768,
    dtype: str = "float32",
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build (or reuse) a tiny random Llama model in out_dir and return its resolved path.

    An existing directory built with the same parameters is reused unless force is set. A directory
    built by this function with other parameters is replaced; any other non-empty directory is only
    replaced with force. The model is built in a temporary sibling directory and renamed into place.
    """
    params: dict[str, Any] = {
        "layers": layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position": max_position,
        "dtype": dtype,
        "seed": seed,
    }
    _check_params(params)
    if head_dim not in CPU_ATTN_HEAD_SIZES:
        print(f"warning: head_dim {head_dim} is not supported by vLLM's CPU attention backend", file=sys.stderr)

    def build(tmp: Path) -> None:
        _build_tokenizer(tmp, vocab_size, max_position)
        _build_model(tmp, params)

    return build_atomically(Path(out_dir), MARKER_FILE, {"format": FORMAT_VERSION, "params": params},
                            REQUIRED_FILES, build, force=force, builder="vllm_hsr.tiny_model")


_HELP = {
    "layers": "number of decoder layers",
    "hidden_size": "hidden size; must equal num_heads * head_dim",
    "num_heads": "attention heads",
    "num_kv_heads": "key/value heads (GQA); must divide num_heads",
    "head_dim": f"head dimension (vLLM CPU attention supports {', '.join(map(str, CPU_ATTN_HEAD_SIZES))})",
    "intermediate_size": "MLP intermediate size",
    "vocab_size": "vocabulary size of the model and tokenizer",
    "max_position": "max_position_embeddings",
    "dtype": "weight dtype",
    "seed": "weight initialisation seed",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_hsr.tiny_model",
        description="Build a tiny random-weight Llama model directory for tests and benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dir", type=Path, help="output model directory")
    for name, param in inspect.signature(build_tiny_model).parameters.items():
        if name in _HELP:
            parser.add_argument(
                "--" + name.replace("_", "-"),
                type=type(param.default),
                default=param.default,
                choices=DTYPES if name == "dtype" else None,
                help=_HELP[name],
            )
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR already holds this model")
    args = vars(parser.parse_args(argv))
    out_dir, force = args.pop("dir"), args.pop("force")
    try:
        path = build_tiny_model(out_dir, force=force, **args)
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))
    print(f"tiny Llama model at {path}: " + " ".join(f"{k}={v}" for k, v in args.items()))


if __name__ == "__main__":
    main()
