"""One settings object: defaults < edgellm.toml < EDGELLM_* environment < CLI flags.

Unknown keys and bad values stop start-up with a message naming them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgellm.errors import ConfigError

APP = "edgellm"
DEFAULT_MODEL = "smollm2-135m-instruct"

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from 300, "300", "30s", "5m", "1h", "7d" or "-1" (negative = forever)."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"not a duration: {value} seconds is beyond any clock") from None
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use seconds, or e.g. '30s', '5m', '1h')")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


class ModelSettings(BaseModel):
    """Per-model overrides of the engine settings (``[models.NAME]`` in edgellm.toml)."""

    model_config = ConfigDict(extra="forbid")

    n_ctx: int | None = Field(default=None, ge=64)
    n_parallel: int | None = Field(default=None, ge=1, le=64)

    n_threads: int | None = Field(default=None, ge=1)
    n_batch: int | None = Field(default=None, ge=1)
    prefill_chunk: int | None = Field(default=None, ge=16)
    prefix_cache: bool | None = None
    batching: Literal["exact", "fused"] | None = None
    n_gpu_layers: int | None = None
    main_gpu: int | None = None
    tensor_split: list[float] | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    keep_alive: float | None = None
    # longest a chat template may take to render one request (seconds)
    template_timeout: float | None = Field(default=None, gt=0, le=60)
    # how tools reach the model: its template's own syntax if edgellm knows it, else
    # the generic format ("auto"); or one of them by name (tool_format.py)
    tool_format: Literal["auto", "generic", "hermes"] | None = None
    # ONNX models (onnxruntime)
    providers: list[str] | None = None  # execution providers, in order of preference
    graph_optimization: Literal["disable", "basic", "extended", "all"] | None = None
    max_batch: int | None = Field(default=None, ge=1, le=1024)  # items per run
    batch_wait_ms: float | None = Field(default=None, ge=0, le=1000)

    _dur = field_validator("keep_alive", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )

    def context_for(self, trained: int) -> int:
        """Each request's context: ``n_ctx``, within what the model was trained on."""
        n = self.n_ctx or 2048
        return min(n, trained) if trained else n


class Thresholds(BaseModel):
    """One signal's thresholds for elevated, throttled, critical, and the margin it
    must clear (for the hold time) before a level is left."""

    model_config = ConfigDict(extra="forbid")

    elevated: float
    throttled: float
    critical: float
    margin: float = Field(ge=0)

    def triple(self) -> tuple[float, float, float, float]:
        return (self.elevated, self.throttled, self.critical, self.margin)


class GovernorSettings(BaseModel):
    """``[governor]`` in edgellm.toml; the README's tuning section explains each."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    poll_interval: float = Field(default=0.5, gt=0)
    hold: float = Field(default=10.0, ge=0)  # how long a signal must stay safe to step down
    trace: Path | None = None  # replay readings from this file instead of the sensors
    memory: Thresholds = Thresholds(elevated=15, throttled=10, critical=5, margin=2)
    cgroup_memory: Thresholds = Thresholds(elevated=85, throttled=92, critical=97, margin=3)
    memory_pressure: Thresholds = Thresholds(elevated=10, throttled=25, critical=50, margin=5)
    gpu_temperature: Thresholds = Thresholds(elevated=80, throttled=87, critical=93, margin=3)
    temperature_below_high: float = 10.0  # elevated this close to a sensor's high mark
    temperature_margin: float = 3.0
    elevated_idle_unload: float = 30.0  # idle models go after this long, not keep_alive
    throttled_thread_fraction: float = Field(default=0.5, gt=0, le=1)
    throttled_slot_fraction: float = Field(default=0.5, gt=0, le=1)
    throttled_max_tokens: int = Field(default=256, ge=0)  # 0: no cap
    throttled_tokens_per_second: float = Field(default=20.0, ge=0)  # for heat; 0: none
    shed_retry_after: float = Field(default=10.0, gt=0)
    # the stability watch
    stuck_after: float = Field(default=30.0, ge=0)  # busy, no progress this long; 0: off
    leak_growth_mb: float = Field(default=256.0, ge=0)  # anonymous RSS growth; 0: off
    leak_settle: float = Field(default=120.0, ge=0)  # after models change, before a baseline

    _dur = field_validator(
        "poll_interval",
        "hold",
        "elevated_idle_unload",
        "shed_retry_after",
        "stuck_after",
        "leak_settle",
        mode="before",
    )(lambda v: parse_duration(v))


class Limits(BaseModel):
    """What one principal holding a role may ask: requests at once, and requests in
    any minute (0: no limit). Beyond either, 429 with Retry-After."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(default=0, ge=0)
    per_minute: int = Field(default=0, ge=0)


def listen_address(value: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` (an IPv6 host in brackets) as (host, port)."""
    if not value.startswith("tcp://"):
        raise ValueError(f"{value!r} is not tcp://HOST:PORT (the Unix socket is `socket`)")
    host, sep, port = value[6:].rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not tcp://HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def default_socket_path() -> Path:
    if os.environ.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "edgellm.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    if os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / APP / "edgellm.sock"
    return Path(f"/tmp/edgellm-{os.getuid()}") / "edgellm.sock"  # no per-user runtime dir


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path(platformdirs.user_data_dir(APP))


def default_config_file() -> Path:
    if os.environ.get("CONFIGURATION_DIRECTORY"):
        return Path(os.environ["CONFIGURATION_DIRECTORY"].split(":")[0]) / "edgellm.toml"
    return Path(platformdirs.user_config_dir(APP)) / "edgellm.toml"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # where things live
    socket: Path = Field(default_factory=default_socket_path)
    socket_mode: int = 0o660
    state_dir: Path = Field(default_factory=default_state_dir)
    catalog_dir: Path | None = None
    vault_key_file: Path = Field(default_factory=lambda: default_config_file().parent / "vault.key")
    cache_dir: Path = Field(
        default_factory=lambda: Path(
            os.environ["CACHE_DIRECTORY"].split(":")[0]
            if os.environ.get("CACHE_DIRECTORY")
            else platformdirs.user_cache_dir(APP)
        )
    )
    default_model: str = DEFAULT_MODEL

    # the socket API
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # connections: open at once, in all and from one peer (a uid on the socket); a new
    # connection's first request headers must arrive within header_timeout, and an idle
    # keep-alive connection (or slow headers after it) is closed after idle_timeout
    max_connections: int = Field(default=512, ge=1)
    max_connections_per_peer: int = Field(default=128, ge=1)
    header_timeout: float = Field(default=10.0, gt=0)
    idle_timeout: float = Field(default=60.0, gt=0)
    shutdown_grace: float = 10.0
    log_level: str = "INFO"

    # the network (off unless listen names an address): every request needs a bearer
    # token, or a client certificate under mutual TLS (tls_client_ca_file)
    listen: list[str] = Field(default_factory=list)  # tcp://HOST:PORT, beside the socket
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # a non-loopback address without TLS is refused unless this says so plainly
    allow_plaintext_network: bool = False
    auth_failures_per_minute: int = Field(default=10, ge=1)  # from one address; then 429
    # per principal, by role ("default": a principal none of whose roles is listed);
    # a principal holding several roles gets the most generous of their limits
    limits: dict[str, Limits] = Field(default_factory=dict)

    # the runtime
    max_queue: int = Field(default=16, ge=0)
    max_loaded_models: int = Field(default=2, ge=1)
    keep_alive: float = 300.0
    request_timeout: float = 600.0
    # after an engine fails (dies or is stuck) the next request reloads its model at once;
    # each further failure doubles the wait, from this many seconds up to 5 minutes
    failure_backoff: float = Field(default=5.0, ge=0)
    memory_reserve_mb: int = Field(default=256, ge=0)
    memory_budget_mb: int = Field(default=0, ge=0)  # 0: no budget beyond available memory
    n_ctx: int = Field(default=2048, ge=64)  # per slot
    n_parallel: int = Field(default=4, ge=1, le=64)
    n_threads: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1)
    n_batch: int = Field(default=512, ge=1)
    prefill_chunk: int = Field(default=256, ge=16)  # also the granularity of prefix reuse
    prefix_cache: bool = True
    # how a turn's prompt chunks meet the running streams: "exact", each chunk in a
    # batch of its own (output alone = output batched, bit for bit); "fused", all of
    # them in the decode step's own batch (README: continuous batching)
    batching: Literal["exact", "fused"] = "exact"
    n_gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    # ONNX models: providers empty = what the installed onnxruntime offers, in its own
    # order (TensorRT only when named: it builds engines for minutes on first load)
    providers: list[str] = Field(default_factory=list)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    max_batch: int = Field(default=32, ge=1, le=1024)  # items (texts, rows) in one run
    # wait this long for more requests to batch with (0: take what is queued, no wait)
    batch_wait_ms: float = Field(default=0.0, ge=0, le=1000)
    default_embedding_model: str = "all-minilm-l6-v2"

    preload: list[str] = Field(default_factory=list)  # loaded and pinned at start-up

    # the vault's audit log: rows older than this many days, or beyond this many rows,
    # are pruned hourly behind a signed checkpoint (0: keep them)
    audit_keep_days: float = Field(default=365, ge=0)
    audit_keep_rows: int = Field(default=1_000_000, ge=0)

    governor: GovernorSettings = Field(default_factory=GovernorSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return int(v, 8)
            except ValueError:
                raise ValueError(f"not an octal file mode: {v!r}") from None
        return v

    @field_validator(
        "keep_alive",
        "shutdown_grace",
        "request_timeout",
        "failure_backoff",
        "header_timeout",
        "idle_timeout",
        mode="before",
    )
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_duration(v)

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, v: Any) -> Any:
        items = [x for x in v.split(",") if x.strip()] if isinstance(v, str) else v
        if isinstance(items, list):
            for item in items:
                listen_address(str(item).strip())
            return [str(x).strip() for x in items]
        return v

    @field_validator("limits")
    @classmethod
    def _limit_roles(cls, v: dict[str, Limits]) -> dict[str, Limits]:
        from edgellm.vault.access import ROLES

        for role in v:
            if role != "default" and role not in ROLES:
                raise ValueError(
                    f"no role {role!r}: limits take {', '.join(sorted(ROLES))} or default"
                )
        return v

    @model_validator(mode="after")
    def _network(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.tls_cert_file is None and not self.allow_plaintext_network:
            for item in self.listen:
                host, _ = listen_address(item)
                if not _loopback(host):
                    raise ValueError(
                        f"{item} is reachable from the network, and without TLS its tokens "
                        "and prompts would cross it in the clear: set tls_cert_file and "
                        "tls_key_file, listen on 127.0.0.1, or set "
                        "allow_plaintext_network = true to accept that"
                    )
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return v.upper()

    def for_model(self, name: str) -> ModelSettings:
        """The effective engine settings of one model: its overrides over the defaults."""
        own = self.models.get(name, ModelSettings())
        merged = {
            key: getattr(own, key) if getattr(own, key) is not None else getattr(self, key, None)
            for key in ModelSettings.model_fields
        }
        return ModelSettings(**merged)


ENV_PREFIX = "EDGELLM_"


# read by the client (client.py), not settings of the daemon
CLIENT_VARIABLES = ("url", "token", "ca_file", "cert_file", "cert_key_file")


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = set(Settings.model_fields) - {"models"}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in CLIENT_VARIABLES or name in ("config", "governor_trace", "failpoints"):
            continue  # read by their own components
        if name not in fields:
            raise ConfigError(f"unknown setting in environment: {key}")
        out[name] = value
    return out


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    if config_file is None and environ.get("EDGELLM_CONFIG"):
        config_file = Path(environ["EDGELLM_CONFIG"])
    explicit = config_file
    path = explicit or default_config_file()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif explicit:
        raise ConfigError(f"config file not found: {path}")
    source = {k: str(path) for k in data}
    env = _from_env(environ)
    source.update({k: f"{ENV_PREFIX}{k.upper()}" for k in env})
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    source.update({k: "command line" for k in flags})
    merged = {**data, **env, **flags}
    try:
        return Settings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across settings: its message names them
            raise ConfigError(str(first["msg"]).removeprefix("Value error, ")) from None
        loc = ".".join(str(p) for p in first["loc"])
        where = source.get(str(first["loc"][0]), "settings")
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {loc!r} (from {where})") from None
        raise ConfigError(f"bad value for {loc!r} (from {where}): {first['msg']}") from None
