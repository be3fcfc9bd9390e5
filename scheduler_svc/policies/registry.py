"""The one list of scheduling policies: name → class, with validated parameters.

An unknown name raises ``NotFound``; parameters that do not fit the policy's schema raise
``InvalidArgument`` naming the bad fields, so a bad swap fails before anything changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from common.errors import InvalidArgument, NotFound
from scheduler_svc.policies.base import Policy
from scheduler_svc.policies.fcfs_full import FcfsFullPolicy
from scheduler_svc.policies.layerkv import LayerKVPolicy
from scheduler_svc.policies.least_loaded import LeastLoadedPolicy
from scheduler_svc.policies.vllm import VllmPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FcfsFullPolicy, LeastLoadedPolicy, LayerKVPolicy, VllmPolicy)
}


@dataclass(frozen=True)
class PolicyDescription:
    """What ``ListPolicies`` shows about one policy."""

    name: str
    description: str
    params_schema_json: str
    defaults: dict[str, Any]


def policy_class(name: str) -> type[Policy]:
    cls = POLICIES.get(name)
    if cls is None:
        raise NotFound(f"unknown policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    return cls


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    """A fresh policy instance with validated parameters."""
    cls = policy_class(name)
    try:
        typed = cls.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArgument(f"bad parameters for policy {name!r}: {problems}") from exc
    return cls(typed)


def policy_params(policy: Policy) -> dict[str, Any]:
    """The policy's parameters as plain JSON values."""
    return dict(policy.params.model_dump(mode="json"))


def describe_policies() -> list[PolicyDescription]:
    return [
        PolicyDescription(
            name=cls.name,
            description=cls.description,
            params_schema_json=json.dumps(cls.Params.model_json_schema()),
            defaults=dict(cls.Params().model_dump(mode="json")),
        )
        for cls in POLICIES.values()
    ]
