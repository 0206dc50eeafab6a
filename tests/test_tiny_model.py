"""The tiny local model builds offline, loads with transformers, and rejects bad settings."""

import json

import pytest

from vllm_hsr.tiny_model import build_tiny_model, main


def test_builds_loads_and_is_reused(tmp_path):
    out = build_tiny_model(tmp_path / "m", layers=1, vocab_size=1024, max_position=2048)
    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"] and config.num_key_value_heads == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) <= config.vocab_size and tokenizer("the quick fox").input_ids
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(tmp_path / "m", layers=1, vocab_size=1024, max_position=2048)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "vllm_hsr_tiny.json").read_text())


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_model(tmp_path / "x", hidden_size=100)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "y"), "--dtype", "int8"])
