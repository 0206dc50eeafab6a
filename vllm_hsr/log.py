"""The one logger hierarchy of vllm-hsr: "vllm_hsr" and its children, printed through vLLM's logging.

vLLM configures only its own "vllm" logger (handler, format, level), and only when an engine or
command line applies its logging config. "vllm_hsr" hands every record to the "vllm" logger at emit
time, so HSR's lines come out through whatever vLLM has configured by then, at its level: formatted
like vLLM's own once an engine runs; before that, through the root logger's handlers (Python's last
resort, for warnings and errors, where it has none).
"""

from __future__ import annotations

import logging

ROOT = "vllm_hsr"

_said: set[tuple[str, str]] = set()


class _ThroughVllm(logging.Handler):
    """Hands each record at or above the "vllm" logger's level to that logger's handlers, or to the root
    logger's where vLLM has none (Python's last resort where neither has any). A handler attached to
    "vllm_hsr" as well already has the record and is skipped."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if record.levelno < vllm_logger.getEffectiveLevel():
            return
        target = vllm_logger if vllm_logger.handlers else logging.getLogger()
        own = logging.getLogger(ROOT).handlers
        for handler in target.handlers:
            if handler not in own and record.levelno >= handler.level:
                handler.handle(record)
        if not target.handlers and logging.lastResort and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


def _set_up_root() -> None:
    root = logging.getLogger(ROOT)
    if not any(isinstance(handler, _ThroughVllm) for handler in root.handlers):
        root.addHandler(_ThroughVllm())
        root.setLevel(logging.DEBUG)      # the level that applies is vLLM's, checked in _ThroughVllm
        root.propagate = False


def init_logger(name: str) -> logging.Logger:
    """The logger `name`, which must be "vllm_hsr" or below it (pass the module's __name__)."""
    if name != ROOT and not name.startswith(ROOT + "."):
        raise ValueError(f"vllm-hsr logs under {ROOT!r}; got logger name {name!r}")
    _set_up_root()
    return logging.getLogger(name)


def warning_once(logger: logging.Logger, message: str, *args) -> None:
    """logger.warning(message, *args), once per process for each distinct text."""
    key = (logger.name, message % args if args else message)
    if key not in _said:
        _said.add(key)
        logger.warning(message, *args)
