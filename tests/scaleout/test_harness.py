"""The proxy tests' own guarantees: a missing nginx fails them (never a skip), templates render fully."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scaleout import harness


def test_a_missing_nginx_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(harness.shutil, "which", lambda name: None)
    monkeypatch.setattr(harness, "DEBIAN_NGINX", tmp_path / "no-nginx")
    with pytest.raises(BaseException) as raised:  # a skip is a BaseException too: it must not be one
        harness.nginx_binary()
    assert raised.type is pytest.fail.Exception
    assert "nginx is not installed" in str(raised.value) and "make system-packages" in str(raised.value)


@pytest.mark.parametrize("template", ["http-affinity", "aesgcm-tls-terminating", "tls-passthrough"])
def test_every_placeholder_of_a_template_is_rendered(template: str) -> None:
    values = {"LISTEN": "127.0.0.1:1", "UPSTREAM_SERVERS": "server 127.0.0.1:2;", "CERT": "c", "KEY": "k",
              "STREAM_MODULE": "m"}  # fmt: skip
    text = harness.render(template, values)
    assert "@" not in text
    with pytest.raises(AssertionError, match="unrendered"):
        harness.render(template, {})
