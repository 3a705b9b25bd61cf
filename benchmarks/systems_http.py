"""The HTTP peer: ``vllm serve`` on loopback and DSPy's own OpenAI-compatible client.

Split from systems.py (same driver surface, see its docstring)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from .systems import BatchResult, Driver, Request, _sampling

SERVED_NAME = "bench"


# ------------------------------------------------------------------------ HTTP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_cli_args(engine_kwargs: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as `vllm serve` flags."""
    import json

    out: list[str] = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value)]
        elif value is not None:
            out += [flag, str(value)]
    return out


class Http(Driver):
    """``vllm serve MODEL --data-parallel-size N`` on loopback, and
    ``dspy.LM("hosted_vllm/...")`` (W2/W4) or async /v1/completions (W1/W3)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], *, dp: int, ignore_eos: bool,
                 start_timeout: float, lm_kwargs: dict[str, Any] | None = None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ignore_eos = ignore_eos
        cmd = [sys.executable, "-m", "benchmarks.serve_shim", "serve", model, "--served-model-name", SERVED_NAME,
               "--host", "127.0.0.1", "--port", str(self.port), "--disable-uvicorn-access-log",
               *engine_cli_args({**engine_kwargs, **({"data_parallel_size": dp} if dp > 1 else {})})]
        print("http: " + " ".join(cmd), flush=True)
        # Its own session, so close() can stop the server and its engine processes together.
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            self._wait_healthy(start_timeout)
        except BaseException:
            self.close()
            raise
        import dspy

        self.dspy_lm = dspy.LM(f"hosted_vllm/{SERVED_NAME}", api_base=self.base + "/v1", api_key="EMPTY",
                               cache=False, **{"temperature": 0.0, **(lm_kwargs or {})})
        self._out_tokens = 0
        self._count_lock = threading.Lock()

    def dspy_call(self, r: Request):
        """DSPy's native OpenAI-compatible path, with vLLM's ``ignore_eos`` in the body.

        A typed lm15 Request, as for every driver (DSPy 3.4 deprecates
        ``lm(messages=...)``; ``dspy_calls``): ``ignore_eos`` is not an OpenAI field, so
        ``extra_body=`` would send the call to LiteLLM, which the GPU kit leaves out; the
        Request carries it in ``config.extensions`` through DSPy's native engine. The
        conversion runs here, inside the measured call, as DSPy's own conversion would.
        """
        import dataclasses

        from dspy import lm15

        request = lm15.request_from_openai_chat({"model": self.dspy_lm.model, "messages": r.messages,
                                                 "max_tokens": r.max_tokens, "temperature": 0.0})
        if self.ignore_eos:
            request = dataclasses.replace(request, config=dataclasses.replace(
                request.config, extensions={**(request.config.extensions or {}), "ignore_eos": True}))
        response = self.dspy_lm(request)
        with self._count_lock:
            self._out_tokens += int(getattr(response.usage, "output_tokens", 0) or 0)
        return [response.text]

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode} during start")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s")

    def batch(self, requests: list[Request]) -> BatchResult:
        import aiohttp

        url = self.base + "/v1/completions"

        async def all_at_once():
            connector = aiohttp.TCPConnector(limit=1024)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
                async def one(r: Request) -> int:
                    body = {"model": SERVED_NAME, "prompt": r.token_ids, **_sampling(r, self.ignore_eos)}
                    async with s.post(url, json=body) as resp:
                        data = await resp.json()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}: {str(data)[:300]}")
                        return int(data["usage"]["completion_tokens"])

                return await asyncio.gather(*[one(r) for r in requests])

        return BatchResult(output_tokens=sum(asyncio.run(all_at_once())))

    def output_tokens(self) -> int:
        """The server's own count (every engine, every path); the client's count if /metrics fails."""
        try:
            with urllib.request.urlopen(self.base + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return self._out_tokens
        name = "vllm:generation_tokens_total"
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ")]
        return int(sum(values)) if values else self._out_tokens

    def close(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
