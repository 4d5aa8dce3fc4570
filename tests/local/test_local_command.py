"""``lambda-split local`` as a user runs it: refusals before anything loads, then a served endpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from tests.local.conftest import MODE
from tests.server.conftest import LiveServer

COMMAND = [sys.executable, "-m", "lambda_split", "local"]


def test_a_non_loopback_host_needs_allow_remote() -> None:
    args = ["--server", "https://127.0.0.1:9", "--security", MODE, "--model", "tiny-random-llama"]
    done = subprocess.run([*COMMAND, *args, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--allow-remote" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_serves_until_sigterm_then_exits_0(trunk: LiveServer) -> None:
    args = [
        "--server",
        trunk.url,
        "--security",
        MODE,
        "--keys",
        str(trunk.keys),
        "--model",
        "tiny-random-llama",
    ]
    env = {**os.environ, "LAMBDA_SPLIT_API_KEY": "k3y"}
    process = subprocess.Popen(
        [*COMMAND, *args, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        headers = {"Authorization": "Bearer k3y"}
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        models = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-random-llama"]
        # greedy: a sampled end token would end the answer early (OpenAI's default temperature is 1)
        body = {"messages": [{"role": "user", "content": "secret prompt"}], "max_tokens": 3, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        answer = reply.json()["choices"][0]["message"]["content"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0
        assert "secret prompt" not in stderr and (not answer.strip() or answer not in stderr)
        assert trunk.service.open_sessions == 0  # the kept conversation's session was closed on the way out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
