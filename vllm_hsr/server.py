"""Run `vllm-hsr serve` on loopback for a while: start, wait until healthy, ask, stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`with LocalServer(model, log_path, [args]) as server: server.complete("...")`."""

    def __init__(self, model: str | Path, log_path: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        script = Path(sys.executable).with_name("vllm-hsr")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "vllm_hsr.cli"]
        self.command = command + ["serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                                  "--served-model-name", "model", *(extra_args or [])]
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LocalServer:
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {self.startup_timeout_s}s:\n{self.log_tail()}")
            try:
                self.get("/health")
                return self
            except OSError:
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return response.read().decode()

    def post(self, path: str, body: dict, timeout_s: float = 300) -> dict:
        request = urllib.request.Request(self.base + path, method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "model", **body}).encode())
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def complete(self, prompt: str, max_tokens: int = 16) -> dict:
        """A greedy completion (/v1/completions)."""
        return self.post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})

    def chat(self, question: str, max_tokens: int = 32) -> str:
        """A greedy chat answer (/v1/chat/completions, the model's chat template)."""
        body = self.post("/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                   "max_tokens": max_tokens, "temperature": 0})
        return body["choices"][0]["message"]["content"]

    def hsr_metrics(self) -> dict[str, float]:
        """The vllm_hsr_* series on /metrics, summed per name and label set."""
        values: dict[str, float] = {}
        for line in self.get("/metrics").splitlines():
            if line.startswith("vllm_hsr_"):
                name, value = line.rsplit(" ", 1)
                values[name] = values.get(name, 0.0) + float(value)
        return values
