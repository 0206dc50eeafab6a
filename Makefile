# The two commands a new user runs: `make demo` (the main job) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.hsr-env

.PHONY: test demo env

env: $(ENV_STAMP)

$(ENV_STAMP): pyproject.toml scripts/bootstrap_env.sh
	bash scripts/bootstrap_env.sh $(VENV)
	touch $@

test: $(ENV_STAMP)
	$(PY) -m pytest -q

demo: $(ENV_STAMP)
	$(PY) -m vllm_hsr.demo
