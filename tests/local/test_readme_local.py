"""README.md's local-endpoint snippets (the openai client and curl) run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2] / "README.md"
BASE = "http://127.0.0.1:8080"


def snippets() -> tuple[str, str]:
    section = README.read_text().split("## A local OpenAI-compatible endpoint", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S)
    curl = re.search(r"```bash\n(curl .*?)```", section, re.S)
    assert python and curl, "the local endpoint's README section lost its python or curl block"
    return python[1], curl[1]


def test_readme_snippets_run_against_a_live_endpoint(make_local: Callable[..., Any]) -> None:
    local, _ = make_local(default_max_tokens=8)  # the snippets name no limit for the streamed answer
    python, curl = snippets()
    assert BASE in python and BASE in curl
    code = python.replace(BASE, local.url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "completion_tokens=" in done.stdout
    command = shlex.split(curl.replace("\\\n", " ").replace(BASE, local.url))
    raw = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    assert raw.rstrip().endswith("data: [DONE]") and '"usage":{"prompt_tokens"' in raw
