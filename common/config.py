"""Typed settings of the services and of ``layerkv up``: the one source of their flags.

The CLI options of ``layerkv scheduler`` / ``worker`` / ``up`` are generated from these fields (a flag
and a ``LAYERKV_<FIELD>`` environment variable each, the description as help; ``layerkv/settings_cli.py``)
and so is docs/cli-contract.md (``python -m layerkv.cli_contract``). ``from_env`` builds settings from
the environment alone (containers, tests). Cross-field checks name the bad values. Nothing here reads
the environment at import time.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import InvalidArgument
from common.security import TLSFiles

ENV_PREFIX = "LAYERKV_"
# Environment variables honoured besides LAYERKV_<FIELD> (the conventional names).
ENV_ALIASES: dict[str, tuple[str, ...]] = {"redis_url": ("REDIS_URL",)}
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def env_names(field: str) -> tuple[str, ...]:
    """The environment variables a setting is read from, in order of precedence."""
    return (ENV_PREFIX + field.upper(), *ENV_ALIASES.get(field, ()))


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Any:
        """Settings from ``LAYERKV_<FIELD>`` variables (plus ``REDIS_URL``), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = next((env[n] for n in env_names(name) if env.get(n)), None)
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**values)

    @classmethod
    def build(cls, **values: Any) -> Any:
        """Validate ``values``; a bad value raises ``InvalidArgument`` naming the field."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
            )
            raise InvalidArgument(f"invalid {cls.__name__}: {problems}") from exc


def _split_addresses(value: Any) -> Any:
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    return value


def _check_host_port(address: str, what: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {address!r} must be host:port")
    return address


class SchedulerSettings(_Settings):
    """``layerkv scheduler``."""

    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (SchedulerService, AdminService, health, "
                      "reflection); 0 picks a free one")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    http_port: int | None = Field(
        None, le=65535, description="OpenAI-compatible HTTP API port; 0: a free one; unset or negative: off"
    )
    served_model_name: str = Field(
        "", max_length=256, description="model id the HTTP API lists and accepts; empty: the workers' model"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", min_length=1, description="request state store")
    redis_prefix: str = Field("layerkv", pattern=r"^[A-Za-z0-9_.-]+$", description="Redis key namespace")
    retention_s: int = Field(86400, ge=1, description="TTL of finished request records and token logs")
    workers: list[str] = Field(default_factory=list,
                               description="worker addresses host:port, comma-separated")
    workers_dns: str = Field("", description="name:port of a headless Service, re-resolved periodically")
    workers_dns_interval_s: float = Field(5.0, gt=0, description="how often --workers-dns is re-resolved")
    policy: str = Field("layerkv", min_length=1, description="initial policy (one stored in Redis wins)")
    policy_params: dict[str, Any] = Field(default_factory=dict, description="initial policy parameters")
    policy_file: str = Field("", description="YAML/JSON {name, params} file watched for changes (a Helm "
                             "ConfigMap); a change swaps the policy")
    policy_file_interval_s: float = Field(2.0, gt=0, description="how often --policy-file is checked")
    queue_limit: int = Field(10000, ge=1, description="waiting requests before RESOURCE_EXHAUSTED")
    tls_cert: str = Field("", description="server certificate PEM; TLS on when set")
    tls_key: str = Field("", description="server private key PEM")
    tls_ca: str = Field("", description="CA of the workers' certificates; with it the scheduler dials "
                        "workers with mutual TLS, its own cert/key as client certificate")
    worker_server_name: str = Field("", description="name expected in worker certificates (override)")
    admin_token: str = Field("", description="bearer token required on AdminService")
    api_token: str = Field("", description="bearer token required on SchedulerService (optional)")
    worker_token: str = Field(
        "", description="bearer token sent on every call to the workers (their --worker-token)")
    registered_worker_ttl_s: float = Field(
        60.0, gt=0,
        description="a self-registered worker unreachable this long is dropped until it registers again")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request leaves it 0")
    round_interval_s: float = Field(0.005, gt=0, description="pause between idle scheduling rounds")
    worker_retry_s: float = Field(1.0, gt=0, description="delay before reconnecting to a down worker")
    log_level: LogLevel = Field("INFO", description="logging level")
    disconnect_grace_s: float = Field(
        1.0, ge=0, description="a request whose clients all went away is cancelled after this long")
    worker_silence_s: float = Field(
        15.0, gt=0, description="a worker whose event stream is silent this long is down (liveness)")
    stream_outbox_events: int = Field(
        1024, ge=1, description="GenerateStream backpressure: events one stream holds for a client that "
        "does not read before its requests pause")
    stream_stall_timeout_s: float = Field(
        30.0, gt=0, description="GenerateStream backpressure: a message unsent this long cancels the "
        "stream's requests (RESOURCE_EXHAUSTED)")

    @field_validator("workers", mode="before")
    @classmethod
    def _parse_workers(cls, value: Any) -> Any:
        return _split_addresses(value)

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: list[str]) -> list[str]:
        return [_check_host_port(a, "worker address") for a in value]

    @field_validator("workers_dns")
    @classmethod
    def _check_dns(cls, value: str) -> str:
        return _check_host_port(value, "--workers-dns") if value else value

    @field_validator("policy_params", mode="before")
    @classmethod
    def _parse_params(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"policy params {value!r} are not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError(f"policy params must be a JSON object, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> SchedulerSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(
                f"--tls-cert and --tls-key go together (cert={self.tls_cert!r}, key={self.tls_key!r})"
            )
        if self.tls_ca and not self.tls_cert:
            raise ValueError(f"--tls-ca={self.tls_ca!r} needs --tls-cert/--tls-key (the client certificate)")
        return self

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(self.tls_cert, self.tls_key, "")  # clients of the scheduler are not mTLS'd

    @property
    def listen_address(self) -> str:
        return f"{self.host}:{self.port}"


class WorkerSettings(_Settings):
    """``layerkv worker``."""

    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(50061, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(9091, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    worker_id: str = Field("", description="stable id (the StatefulSet pod name); empty: host name + port")
    model: str = Field("tiny-llama", min_length=1, description="local HF folder, .gguf file, a model name "
                       "(smollm2) or a built-in preset (tiny-llama)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="model and KV dtype; auto: bfloat16 on CUDA, float32 on CPU")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    gpu_blocks: int | None = Field(None, ge=0, description="GPU-tier blocks; None: automatic")
    host_blocks: int | None = Field(None, ge=0, description="host-tier blocks; None: automatic")
    staging_blocks: int | None = Field(
        None, ge=0, description="GPU staging blocks that host-placed layers are computed in; None: automatic")
    gpu_kv_gib: float | None = Field(None, gt=0, description="GPU tier size in GiB instead of blocks")
    host_kv_gib: float | None = Field(None, ge=0, description="host tier size in GiB instead of blocks")
    preemption_mode: Literal["recompute", "swap-layers"] = Field(
        "recompute", description="how a request is preempted when KV growth finds no room (dispatch default)")
    host_access: Literal["auto", "stream", "direct"] = Field(
        "auto", description="how attention reads host-placed layers: stream (through GPU staging blocks, "
        "prefetched layer by layer), direct (in place, no staging: only where the host tier is the compute "
        "device's own memory, i.e. on CPU); auto: direct on CPU, stream on CUDA")
    max_num_batched_tokens: int = Field(
        2048, ge=1, le=1 << 20, description="tokens per engine step: decodes first, then prefill chunks")
    max_model_len: int | None = Field(None, ge=1, description="cap on prompt + max_tokens; None: the model's")
    max_num_seqs: int = Field(256, ge=1, description="most requests holding KV blocks at once")
    max_prefill_tokens: int = Field(8192, ge=1, description="prompt tokens packed into one prefill step")
    max_promotions_per_step: int = Field(2, ge=0,
                                         description="host layers promoted back to GPU per decode step")
    attention_backend: Literal["auto", "sdpa", "flash-attn"] = Field(
        "auto", description="attention kernels; auto: flash-attn on CUDA when installed, else SDPA")
    default_placement: Literal["auto", "all-gpu", "rule"] = Field(
        "auto", description="placement of requests that name none")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of free CUDA memory used")
    profile: Literal["off", "startup", "file"] = Field(
        "startup", description="cost model: startup measures it (copy bandwidth, prefill and decode step "
        "times; about a second on tiny-llama); file loads --profile-file, measuring and saving it when "
        "missing; off advertises built-in defaults")
    profile_file: str = Field("", description="saved profile (JSON) of --profile file")
    profile_budget_s: float = Field(
        1.0, gt=0, le=600, description="soft time limit of one profile: one pass always runs, repeats "
        "only while it lasts")
    seed: int = Field(0, ge=0, description="random weights of presets and default sampling seeds")
    threads: int = Field(
        0, ge=0, le=1024,
        description="torch intra-op threads; 0: the cores this process may use (its CPU affinity)")
    scheduler: str = Field("", description="scheduler address to self-register with")
    advertise_address: str = Field("", description="address the scheduler should dial; empty: host:port")
    tls_cert: str = Field("", description="server certificate PEM; TLS on when set")
    tls_key: str = Field("", description="server private key PEM")
    tls_ca: str = Field("", description="CA whose client certificates are required (mutual TLS)")
    scheduler_identity: str = Field("", description="with mutual TLS, the only client-certificate common "
                                    "name allowed to dispatch")
    scheduler_lease_s: float = Field(
        30.0, ge=0, description="no scheduler subscribed this long: abort every request (0 disables)")
    admin_token: str = Field("", description="token used when self-registering")
    worker_token: str = Field(
        "", description="bearer token required on every WorkerService call (the scheduler's --worker-token)")
    log_level: LogLevel = Field("INFO", description="logging level")

    @model_validator(mode="after")
    def _check(self) -> WorkerSettings:
        if self.gpu_blocks is not None and self.gpu_kv_gib is not None:
            raise ValueError(
                f"give --gpu-blocks ({self.gpu_blocks}) or --gpu-kv-gib ({self.gpu_kv_gib}), not both"
            )
        if self.host_blocks is not None and self.host_kv_gib is not None:
            raise ValueError(
                f"give --host-blocks ({self.host_blocks}) or --host-kv-gib ({self.host_kv_gib}), not both"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(
                f"--tls-cert and --tls-key go together (cert={self.tls_cert!r}, key={self.tls_key!r})"
            )
        if self.tls_ca and not self.tls_cert:
            raise ValueError(f"--tls-ca={self.tls_ca!r} needs --tls-cert/--tls-key")
        if self.scheduler_identity and not self.tls_ca:
            raise ValueError(f"--scheduler-identity={self.scheduler_identity!r} needs mutual TLS (--tls-ca)")
        if self.profile == "file" and not self.profile_file:
            raise ValueError("--profile file needs --profile-file PATH (where the profile is saved)")
        if self.profile_file and self.profile != "file":
            raise ValueError(f"--profile-file={self.profile_file!r} is read only with --profile file "
                             f"(got --profile {self.profile})")
        if self.scheduler:
            _check_host_port(self.scheduler, "--scheduler")
        if self.advertise_address:
            _check_host_port(self.advertise_address, "--advertise-address")
        return self

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(self.tls_cert, self.tls_key, self.tls_ca)

    def resolved_worker_id(self, bound_port: int) -> str:
        return self.worker_id or f"{socket.gethostname()}:{bound_port}"

    def resolved_advertise_address(self, bound_port: int) -> str:
        return self.advertise_address or f"{socket.gethostname()}:{bound_port}"


# Fields of the services that ``layerkv up`` sets itself for each child (addresses, ids, TLS,
# tokens); every other field of SchedulerSettings and WorkerSettings is also an ``up`` flag, passed
# through to the children that have it.
UP_SETS_PER_PROCESS = frozenset({
    "host", "port", "metrics_port", "worker_id", "scheduler", "advertise_address", "redis_url",
    "redis_prefix", "workers", "workers_dns", "tls_cert", "tls_key", "tls_ca", "worker_server_name",
    "scheduler_identity", "admin_token", "api_token", "worker_token", "log_level",
})


class UpSettings(_Settings):
    """``layerkv up``: its own settings (plus the services' pass-through ones, see ``up_passthrough``)."""

    workers: int = Field(2, ge=1, le=64, description="number of worker processes")
    model: str = Field("", description="model of every worker; empty: smollm2 for --demo when installed, "
                                       "else the tiny-llama preset")
    host: str = Field("127.0.0.1", min_length=1, description="listen address of every process")
    port: int = Field(50051, ge=0, le=65535, description="scheduler gRPC port (taken or 0: a free one)")
    metrics_port: int = Field(9090, ge=0, le=65535,
                              description="scheduler /metrics port (taken or 0: a free one)")
    http_port: int = Field(8000, le=65535,
                           description="OpenAI HTTP API port (taken or 0: a free one; negative: off)")
    redis_url: str = Field("", description="use this Redis instead of starting a redis-server")
    demo: bool = Field(False, description="ask the model one question, print the answer, stop")
    prompt: str = Field("", description="send this prompt, print the answer, stop")
    max_tokens: int = Field(32, ge=1, description="tokens to generate for --demo/--prompt")
    startup_timeout_s: float = Field(180.0, gt=0, description="give up when not ready after this")


def up_passthrough() -> dict[str, list[type[_Settings]]]:
    """Service fields that are also ``up`` flags -> the settings classes (children) that take them."""
    out: dict[str, list[type[_Settings]]] = {}
    for cls in (WorkerSettings, SchedulerSettings):
        for name in cls.model_fields:
            if name not in UP_SETS_PER_PROCESS and name not in UpSettings.model_fields:
                out.setdefault(name, []).append(cls)
    return out
