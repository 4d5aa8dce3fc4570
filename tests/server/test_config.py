"""Server configuration: precedence, and failing closed on anything unsafe or invalid."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import ConfigError, load_config


def test_file_then_environment_then_arguments(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text('[server]\nsecurity = "plain"\nport = 9000\n[limits]\nmax_sessions = 5\nmax_batch = 2\n')
    config = load_config(file, {"LAMBDA_SPLIT_MAX_SESSIONS": "7", "LAMBDA_SPLIT_PORT": "9001"}, port=9002)
    assert (config.security, config.port, config.max_sessions, config.max_batch) == ("plain", 9002, 7, 2)
    assert config.validate().service_limits().max_sessions == 7


@pytest.mark.parametrize(
    "settings",
    [
        {"security": "plain", "host": "0.0.0.0"},
        {"security": "tls"},
        {"security": "aesgcm"},
        {"security": ""},
        {"security": "rot13"},
        {"security": "plain", "max_sessions": 0},
        {"security": "plain", "idle_timeout_s": 0},
        {"security": "plain", "max_tokens_per_session": 0},
        {"security": "plain", "max_body_bytes": 0},
        {"security": "plain", "receive_timeout_s": 0},
        {"security": "plain", "max_diffusion_steps": 0},
        {"security": "plain", "port": 70000},
        {"security": "plain", "max_batch_rows": 0},
        {"security": "plain", "step_deadline_s": 0},
        {"security": "plain", "step_deadline_s": float("nan")},
        {"security": "plain", "step_deadline_s": float("inf")},
        {"security": "plain", "receive_timeout_s": float("nan")},
    ],
)
def test_unsafe_or_invalid_settings_fail_closed(settings: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_config(None, {}, **settings).validate()


def test_plain_on_a_public_address_needs_the_explicit_flag() -> None:
    load_config(None, {}, security="plain", host="0.0.0.0", insecure_plain=True).validate()


def test_unknown_file_settings_and_bad_values_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text("max_sesions = 3\n")
    with pytest.raises(ConfigError, match="max_sesions"):
        load_config(file, {})
    with pytest.raises(ConfigError, match="port"):
        load_config(None, {"LAMBDA_SPLIT_PORT": "eighty"})


def test_security_follows_the_same_precedence_as_every_setting(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text('[server]\nsecurity = "tls+aesgcm"\n')
    assert load_config(file, {}).security == "tls+aesgcm"
    assert load_config(file, {"LAMBDA_SPLIT_SECURITY": "aesgcm"}).security == "aesgcm"
    assert load_config(file, {"LAMBDA_SPLIT_SECURITY": "aesgcm"}, security="plain").security == "plain"
    assert load_config(None, {"LAMBDA_SPLIT_SECURITY": "plain"}, security=None).validate().security == "plain"


def test_no_security_mode_is_refused_naming_where_to_set_it() -> None:
    with pytest.raises(
        ConfigError, match=r"no security mode: pass --security, .*\[server\].*LAMBDA_SPLIT_SECURITY"
    ):
        load_config(None, {}).validate()


def test_unknown_sections_are_refused_naming_the_valid_ones(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text('[sever]\nsecurity = "plain"\n[limits]\nmax_batch = 2\n')
    with pytest.raises(
        ConfigError, match=r"unknown section\(s\) in .*: \[sever\]; valid sections are \[server\], \[limits\]"
    ):
        load_config(file, {})


@pytest.mark.parametrize("split", ["0:5", "5:3", "2", "a:b", "2:-2:1"])
def test_bad_splits_are_refused_before_any_model_is_opened(split: str) -> None:
    with pytest.raises(ConfigError, match="split"):
        load_config(None, {}, security="plain", split=split).validate()


def test_the_diffusion_step_limit_comes_from_the_config_file(tmp_path: Path) -> None:
    from server.run import load_service

    file = tmp_path / "server.toml"
    file.write_text(
        '[server]\nsecurity = "plain"\nmodel = "tiny-random-sd"\n[limits]\nmax_diffusion_steps = 7\n'
    )
    service, info = load_service(load_config(file, {}).validate(), lambda _message: None)
    assert info["limits"]["max_steps_per_session"] == 7
    assert service.executor.limits.max_steps_per_session == 7  # type: ignore[attr-defined]


def test_batching_limits_come_from_the_limits_section(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text('[server]\nsecurity = "plain"\n[limits]\nmax_batch_rows = 12\nstep_deadline_s = 2.5\n')
    scheduling = load_config(file, {}).validate().scheduler_config()
    assert (scheduling.max_rows, scheduling.deadline_s) == (12, 2.5)
    env = {"LAMBDA_SPLIT_MAX_BATCH_ROWS": "4", "LAMBDA_SPLIT_STEP_DEADLINE_S": "9"}
    assert load_config(file, env).validate().scheduler_config().max_rows == 4
    defaults = load_config(None, {}, security="plain").validate().scheduler_config()
    assert (defaults.max_rows, defaults.deadline_s) == (32, 30.0)


def test_serve_hands_the_batching_limits_to_the_scheduler(tmp_path: Path) -> None:
    file = tmp_path / "server.toml"
    file.write_text(
        '[server]\nsecurity = "plain"\nmodel = "tiny-random-llama"\nsplit = "2:-2"\n'
        "[limits]\nmax_batch_rows = 5\nstep_deadline_s = 3.5\n"
    )
    from server.run import load_service

    service, _info = load_service(load_config(file, {}).validate(), lambda _message: None)
    used = service.executor.scheduler.config  # type: ignore[attr-defined]
    assert (used.max_rows, used.deadline_s) == (5, 3.5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_batch_rows = 0", "max_batch_rows must be at least 1"),
        ("max_batch_rows = 'many'", "max_batch_rows must be a int"),
        ("step_deadline_s = -1", "step_deadline_s must be positive"),
        ("step_deadline_s = nan", "step_deadline_s must be positive"),
        ("step_deadline_s = inf", "step_deadline_s must be a finite number"),
    ],
)
def test_bad_batching_limits_are_refused_naming_the_key(tmp_path: Path, line: str, message: str) -> None:
    file = tmp_path / "server.toml"
    file.write_text(f'[server]\nsecurity = "plain"\n[limits]\n{line}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(file, {}).validate()
