"""README.md's client snippet runs as written, `~` in the keys path included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lambda_split import Checkpoint
from secure_channel import generate_credentials
from tests.server.conftest import start_server

README = Path(__file__).resolve().parents[1] / "README.md"


def client_snippet() -> str:
    section = README.read_text().split("## Client library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Client library section has no python block"
    return match[1]


def test_the_readme_client_snippet_runs_with_a_tilde_keys_path(tiny: Checkpoint, tmp_path: Path) -> None:
    snippet = client_snippet()
    assert 'keys="~/.lambda-split/keys"' in snippet
    keys = tmp_path / ".lambda-split" / "keys"
    generate_credentials(keys, days=1)
    server = start_server(tiny, "tls+aesgcm", keys)
    try:
        # Only the address and the model change: a live loopback server with the tiny model.
        code = snippet.replace("https://trunk.example:8443", server.url).replace(
            '"smollm2-135m"', '"tiny-random-llama"'
        )
        assert code != snippet
        env = {**os.environ, "HOME": str(tmp_path)}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
        )
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert "[" in out.stdout  # the printed token ids
