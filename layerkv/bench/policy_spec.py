"""Policy variants of one ``layerkv bench`` invocation: ``NAME[:KEY=VALUE...][@LABEL]``.

``--policies vllm,layerkv:slack_gate=false@layerkv-nogate,layerkv`` runs three variants; a
variant's label names it in tables, JSON and plots (default: the spec text itself). Values are JSON
(``false``, ``1.5``, ``"mean"``) or, when they do not parse as JSON, plain strings (``mean``).
Parameters are checked against the policy's schema here, before any system starts, so a typo
fails at once with the policy's own message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument, LayerKVError

_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
SYNTAX = "NAME[:KEY=VALUE[:KEY=VALUE...]][@LABEL]"


@dataclass(frozen=True)
class PolicySpec:
    """One policy variant to benchmark."""

    name: str  # the registered policy name (scheduler_svc.policies.registry)
    params: dict[str, Any] = field(default_factory=dict)  # sent with SetPolicy; missing ones default
    label: str = ""  # how tables and plots call it; unique within an invocation

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: `output_prediction=mean`


def parse_policy_spec(text: str) -> PolicySpec:
    """One variant: ``layerkv:slack_gate=false@nogate`` → name, params and label."""
    raw = text.strip()
    body, at, label = raw.partition("@")
    if at and not _LABEL.match(label):
        raise InvalidArgument(
            f"policy spec {raw!r}: label {label!r} must be letters, digits and _.+- (syntax {SYNTAX})"
        )
    name, *pairs = body.split(":")
    if not _NAME.match(name):
        raise InvalidArgument(f"policy spec {raw!r}: {name!r} is not a policy name (syntax {SYNTAX})")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise InvalidArgument(f"policy spec {raw!r}: {pair!r} must be KEY=VALUE (syntax {SYNTAX})")
        if key.strip() in params:
            raise InvalidArgument(f"policy spec {raw!r}: parameter {key.strip()!r} given twice")
        params[key.strip()] = _value(value.strip())
    # Without a label a variant with parameters is called by its spec, so it never hides as `name`.
    return PolicySpec(name, params, label if at else body)


def parse_policy_specs(
    text: str, extra_params: Mapping[str, Mapping[str, Any]] | None = None
) -> list[PolicySpec]:
    """Comma-separated variants, validated; the first is the baseline of the ratios.

    ``extra_params`` (``--params NAME=JSON``) apply to every variant whose name or label is
    ``NAME``; the variant's own ``KEY=VALUE`` pairs win over them.
    """
    specs = [parse_policy_spec(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise InvalidArgument(f"--policies {text!r} names no policy (syntax {SYNTAX}, comma-separated)")
    extra = dict(extra_params or {})
    known = {s.name for s in specs} | {s.label for s in specs}
    unused = sorted(set(extra) - known)
    if unused:
        raise InvalidArgument(f"--params for {', '.join(unused)}: no such policy or label in --policies")
    merged = [
        PolicySpec(s.name, {**extra.get(s.name, {}), **extra.get(s.label, {}), **s.params}, s.label)
        for s in specs
    ]
    _check_labels(merged)
    for spec in merged:
        validate(spec)
    return merged


def _check_labels(specs: Sequence[PolicySpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.label in seen:
            raise InvalidArgument(
                f"--policies: two variants are labelled {spec.label!r}; give one a label with @LABEL"
            )
        seen.add(spec.label)


def validate(spec: PolicySpec) -> None:
    """Raise ``InvalidArgument`` / ``NotFound`` when the scheduler would refuse this variant."""
    from scheduler_svc.policies.registry import make_policy

    try:
        make_policy(spec.name, spec.params)
    except LayerKVError as exc:
        raise type(exc)(f"policy spec {spec.label!r}: {exc}") from exc
