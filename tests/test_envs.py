"""One module declares every environment variable (HSR_*, the old VLLM_HSR_* names deprecated) and one
logger hierarchy ("vllm_hsr") carries every log line."""

import logging
import re
from pathlib import Path

import pytest

from vllm_hsr import HSRConfig, envs, log

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [path for folder in ("vllm_hsr", "kernels") for path in (ROOT / folder).rglob("*.py")]


def test_no_module_but_envs_reads_an_hsr_variable():
    read = re.compile(r"""environ(?:\.get)?[\(\[]\s*["']([A-Z0-9_]+)["']""")
    for path in SOURCES:
        text = path.read_text()
        if path.name != "envs.py":
            assert "VLLM_HSR_" not in text, path
        for name in read.findall(text):
            assert not name.startswith(("HSR_", "VLLM_HSR_")), (path, name)


def test_every_logger_is_in_the_vllm_hsr_hierarchy():
    for path in SOURCES:
        if path.name == "log.py":
            continue
        text = path.read_text()
        assert "logging.getLogger(" not in text and "_vllm.init_logger" not in text, path
        for name in re.findall(r"init_logger\(([^)]*)\)", text):
            assert name == "__name__", (path, name)


def test_new_names_win_and_old_ones_still_work_with_one_warning(caplog):
    envs._warned.clear()
    assert envs.get("KERNELS", {"HSR_KERNELS": "torch", "VLLM_HSR_KERNELS": "native"}) == "torch"
    with caplog.at_level(logging.WARNING):
        assert envs.get("KERNELS", {"VLLM_HSR_KERNELS": "native"}) == "native"
        assert envs.get("KERNELS", {"VLLM_HSR_KERNELS": "native"}) == "native"
    assert caplog.text.count("VLLM_HSR_KERNELS is deprecated") == 1 and "set HSR_KERNELS instead" in caplog.text
    assert HSRConfig.from_vllm(None, {"VLLM_HSR_EPS": "0.01"}).eps == 0.01
    assert HSRConfig.from_vllm(None, {"VLLM_HSR_EPS": "0.01", "HSR_EPS": "0.02"}).eps == 0.02
    with pytest.raises(KeyError, match="not a declared"):
        envs.get("NO_SUCH_VARIABLE")


def test_the_table_lists_every_variable_and_setting():
    table = envs.describe({"HSR_MODE": "topk"})
    for var in envs.VARIABLES.values():
        assert f"`{var.variable}`" in table
    for name in HSRConfig.field_names():
        assert f"`HSR_{name.upper()}`" in table
    assert f"| `HSR_MODE` | `{HSRConfig().mode!r}` | overrides HSRConfig.mode | `topk` |" in table


def test_vllm_does_not_call_hsr_variables_unknown(monkeypatch):
    """vLLM refuses unknown VLLM_* variables under --fail-on-environ-validation; HSR_* it leaves alone."""
    from vllm.platforms import current_platform
    for name in [k for k in __import__("os").environ if k.startswith("VLLM_HSR_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HSR_MODE", "topk")
    monkeypatch.setenv("HSR_KERNELS", "auto")
    current_platform.validate_environ(hard_fail=True)
    monkeypatch.setenv("VLLM_HSR_MODE", "topk")                  # why the prefix changed
    with pytest.raises(ValueError, match="Unknown vLLM environment variable detected: VLLM_HSR_MODE"):
        current_platform.validate_environ(hard_fail=True)


def test_hsr_lines_go_through_vllms_logger(monkeypatch):
    """Whatever vLLM has configured when a line is logged (its handlers, its level) applies to HSR's lines."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)
    vllm_logger = logging.getLogger("vllm")
    monkeypatch.setattr(vllm_logger, "handlers", [Collect()])
    monkeypatch.setattr(vllm_logger, "level", logging.INFO)
    monkeypatch.setattr(logging.getLogger("vllm_hsr"), "propagate", False)
    logger = log.init_logger("vllm_hsr.some_module")
    logger.info("an info line")
    logger.debug("a debug line")                 # below vLLM's level: dropped
    assert [(r.name, r.getMessage()) for r in records] == [("vllm_hsr.some_module", "an info line")]
    monkeypatch.setattr(vllm_logger, "level", logging.WARNING)
    logger.info("quiet now")
    log.warning_once(logger, "said %s", "once")
    log.warning_once(logger, "said %s", "once")
    assert [r.getMessage() for r in records] == ["an info line", "said once"]
    with pytest.raises(ValueError, match="logs under 'vllm_hsr'"):
        log.init_logger("vllm.hsr")


def test_the_readme_documents_every_setting_and_variable():
    readme = (ROOT / "README.md").read_text()
    for name in HSRConfig.field_names():
        assert f"| `{name}` |" in readme and f"`HSR_{name.upper()}`" in readme, name
    for var in envs.VARIABLES.values():
        assert f"`{var.variable}`" in readme, var.variable
