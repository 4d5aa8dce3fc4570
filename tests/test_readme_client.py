"""README.md's client snippet runs as written, `~` in the keys path included."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lambda_split import Checkpoint
from secure_channel import generate_credentials
from tests.server.conftest import start_server

README = Path(__file__).resolve().parents[1] / "README.md"


def client_snippet() -> str:
    section = README.read_text().split("## Client library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's Client library section has no python block"
    return match[1]


def test_the_readme_client_snippet_runs_with_a_tilde_keys_path(
    tiny: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
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
        # Run as a script of its own (its own globals), in this process: a new interpreter would
        # only add seconds of importing torch; the `~` is the HOME set here.
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "README.md client snippet", "exec"), {"__name__": "__main__"})
    finally:
        server.stop()
    assert "[" in capsys.readouterr().out  # the printed token ids
