"""Server configuration: defaults < TOML file < environment < command line. Unsafe settings fail closed."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambda_split import SchedulerConfig, ServiceLimits, SplitSpec
from lambda_split._codec import FrameLimits
from lambda_split._head_depth import HeadDepths
from secure_channel import check_security_mode

ENV_PREFIX = "LAMBDA_SPLIT_"
SECTIONS = ("server", "limits")
_ANY_DEPTH = 2**31
NO_SECURITY = (
    "no security mode: pass --security, set security in the [server] section of FILE, "
    f"or {ENV_PREFIX}SECURITY"
)


class ConfigError(ValueError):
    """The configuration is invalid or unsafe; the server refuses to start."""


@dataclass(frozen=True)
class ServerConfig:
    model: str = "smollm2-135m"
    split: str = "2:-2"
    # LO:HI: sessions may choose their head depth in [LO, HI] (LO <= A <= HI < B); "" means only A
    head_depths: str = ""
    security: str = ""
    keys: str | None = None
    host: str = "127.0.0.1"
    port: int = 8443
    insecure_plain: bool = False
    # request hygiene
    max_body_bytes: int = 64 * 1024 * 1024
    receive_timeout_s: float = 30.0
    max_concurrency: int = 32
    rate_limit_per_s: float = 200.0
    rate_limit_burst: int = 400
    handshake_rate_per_s: float = 5.0
    handshake_burst: int = 20
    expiry_interval_s: float = 5.0
    # trunk sessions
    max_sessions: int = 64
    max_tokens_per_session: int = 4096
    max_batch: int = 8
    max_step_tokens: int = 2048
    idle_timeout_s: float = 300.0
    max_cache_bytes: int = 2 * 1024**3
    max_diffusion_steps: int = 256  # U-Net calls per diffusion session
    max_sessions_per_identity: int = 32  # one device cannot take every session (not in plain mode)
    # cross-session batching (lambda_split/_scheduler.py)
    max_batch_rows: int = 32  # rows of one batched decode forward, over all sessions in it
    step_deadline_s: float = 30.0  # a step still queued after this fails with 503 step_timeout
    # proxies whose X-Forwarded-For/-Proto uvicorn believes: comma-separated IPs or CIDRs; none by default
    trusted_proxies: str = ""
    # rolling restarts: after SIGTERM, refuse new sessions and wait this long for open ones to end
    drain_timeout_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)

    def service_limits(self) -> ServiceLimits:
        return ServiceLimits(
            max_sessions=self.max_sessions,
            max_tokens_per_session=self.max_tokens_per_session,
            max_batch=self.max_batch,
            max_step_tokens=self.max_step_tokens,
            idle_timeout_s=self.idle_timeout_s,
            max_cache_bytes=self.max_cache_bytes,
            max_sessions_per_owner=None if self.security == "plain" else self.max_sessions_per_identity,
            frame=FrameLimits(max_bytes=self.max_body_bytes),
        )

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_rows=self.max_batch_rows, deadline_s=self.step_deadline_s)

    def validate(self) -> ServerConfig:
        """Return self if safe to run, else raise ConfigError naming the problem."""
        if not self.security:
            raise ConfigError(NO_SECURITY)
        try:
            check_security_mode(self.security)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:  # the syntax and 1 <= A <= B; B against the real layer count once the model is open
            SplitSpec.parse(self.split, num_layers=_ANY_DEPTH)
        except ValueError as exc:
            raise ConfigError(str(exc).replace(f" <= {_ANY_DEPTH}", "")) from None
        if self.head_depths:
            self.split_depths(_ANY_DEPTH)
        if self.security != "plain" and not self.keys:
            raise ConfigError(
                f"--security {self.security} needs --keys DIR (create one with: lambda-split keys init DIR)"
            )
        if self.security == "plain" and not _is_loopback(self.host) and not self.insecure_plain:
            raise ConfigError(
                f"refusing to serve plain HTTP on non-loopback address {self.host}: anyone on the path can read "
                "the hidden states and invert them; pass --insecure-plain if you really mean it"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be in 0..65535")
        for name in (
            "max_body_bytes",
            "max_concurrency",
            "rate_limit_burst",
            "handshake_burst",
            "max_diffusion_steps",
            "max_sessions_per_identity",
            "max_batch_rows",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in (
            "receive_timeout_s",
            "rate_limit_per_s",
            "handshake_rate_per_s",
            "expiry_interval_s",
            "step_deadline_s",
        ):
            if not getattr(self, name) > 0:  # NaN too
                raise ConfigError(f"{name} must be positive")
        for proxy in filter(None, (p.strip() for p in self.trusted_proxies.split(","))):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_proxies: {proxy!r} is not an IP address or network") from None
        if not math.isfinite(self.step_deadline_s):
            raise ConfigError("step_deadline_s must be a finite number of seconds")
        try:  # the session and scheduler limits check themselves
            self.service_limits()
            self.scheduler_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def split_depths(self, num_layers: int) -> HeadDepths | None:
        """The head depths allowed (None: only the split's own), checked against the split of a
        model of ``num_layers`` layers (``_ANY_DEPTH``: as far as a negative B allows); ConfigError."""
        if not self.head_depths:
            return None
        try:
            depths = HeadDepths.parse(self.head_depths)
            spec = SplitSpec.parse(self.split, num_layers)  # a negative B checks once num_layers is known
            depths.check_split(spec.start, spec.stop)
        except ValueError as exc:
            raise ConfigError(f"head_depths: {exc}") from None
        return depths


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig) if f.name != "extra"}


def _coerce(name: str, value: Any) -> Any:
    kind = type(getattr(ServerConfig(), name))
    if name == "keys":
        return None if value in (None, "") else str(value)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r}") from None


def load_config(
    file: str | Path | None = None, environ: dict[str, str] | None = None, **overrides: Any
) -> ServerConfig:
    """Merge defaults, a TOML file (keys at top level or under [server] and [limits]; any other
    section is refused), environment variables named ``LAMBDA_SPLIT_<FIELD>`` and explicit
    overrides (``None`` means not given), later ones winning. Nothing is validated here: call
    :meth:`ServerConfig.validate`."""
    values: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from None
        flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
        sections = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in SECTIONS)
        if sections:
            raise ConfigError(
                f"unknown section(s) in {file}: {', '.join(f'[{s}]' for s in sections)}; "
                f"valid sections are {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        for section in SECTIONS:
            flat.update(data.get(section, {}))
        unknown = set(flat) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {file}: {', '.join(sorted(unknown))}")
        values.update(flat)
    env = os.environ if environ is None else environ
    for name in _FIELDS:
        if (ENV_PREFIX + name.upper()) in env:
            values[name] = env[ENV_PREFIX + name.upper()]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServerConfig(**{k: _coerce(k, v) for k, v in values.items()})
