"""Policy variants of ``layerkv bench --policies``: parsing, labels, parameters, clear errors."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument, NotFound
from layerkv.bench.policy_spec import PolicySpec, parse_policy_spec, parse_policy_specs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vllm", PolicySpec("vllm", {}, "vllm")),
        (" layerkv ", PolicySpec("layerkv", {}, "layerkv")),
        ("layerkv@lk", PolicySpec("layerkv", {}, "lk")),
        (
            "layerkv:prefill_safety=1.5:output_prediction=mean@lk-mean",
            PolicySpec("layerkv", {"prefill_safety": 1.5, "output_prediction": "mean"}, "lk-mean"),
        ),
        # JSON values keep their type; without a label the spec text names the variant.
        (
            "layerkv:skip_blocked=true:headroom_blocks=2",
            PolicySpec(
                "layerkv",
                {"skip_blocked": True, "headroom_blocks": 2},
                "layerkv:skip_blocked=true:headroom_blocks=2",
            ),
        ),
        (
            'layerkv:queue_order="fcfs"',
            PolicySpec("layerkv", {"queue_order": "fcfs"}, 'layerkv:queue_order="fcfs"'),
        ),
    ],
)
def test_spec_parsing(text: str, expected: PolicySpec) -> None:
    assert parse_policy_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layerkv:prefill_safety", "must be KEY=VALUE"),
        ("layerkv:=1", "must be KEY=VALUE"),
        ("layerkv:prefill_safety=", "must be KEY=VALUE"),
        ("layerkv:a=1:a=2", "given twice"),
        ("Layer KV", "is not a policy name"),
        (":x=1", "is not a policy name"),
        ("layerkv@", "label ''"),
        ("layerkv@my label", "label 'my label'"),
    ],
)
def test_bad_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        parse_policy_spec(text)
    assert "NAME[:KEY=VALUE" in str(info.value) or "twice" in message  # the syntax is shown


def test_specs_list_keeps_order_and_validates_against_the_registry() -> None:
    specs = parse_policy_specs("vllm, layerkv:prefill_safety=2@lk2 ,layerkv")
    assert [(s.name, s.label) for s in specs] == [
        ("vllm", "vllm"),
        ("layerkv", "lk2"),
        ("layerkv", "layerkv"),
    ]
    assert specs[1].params == {"prefill_safety": 2}


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("", InvalidArgument, "names no policy"),
        (" , ", InvalidArgument, "names no policy"),
        ("vllm,nosuch", NotFound, "unknown policy 'nosuch'"),
        ("layerkv:prefill_safety=0.5", InvalidArgument, "prefill_safety"),  # below its ge=1.0
        ("layerkv:no_such_param=1@x", InvalidArgument, "'x'.*no_such_param"),
        ("layerkv,layerkv", InvalidArgument, "two variants are labelled 'layerkv'"),
        ("vllm@a,layerkv@a", InvalidArgument, "labelled 'a'"),
    ],
)
def test_bad_lists_are_refused_before_anything_runs(text: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse_policy_specs(text)


def test_params_option_applies_by_name_or_label_and_the_spec_wins() -> None:
    extra = {"layerkv": {"prefill_safety": 1.5, "skip_blocked": True}, "lk": {"prefill_safety": 3.0}}
    specs = parse_policy_specs("vllm,layerkv,layerkv:prefill_safety=2@lk2,layerkv@lk", extra)
    assert [s.params for s in specs] == [
        {},
        {"prefill_safety": 1.5, "skip_blocked": True},
        {"prefill_safety": 2, "skip_blocked": True},  # its own pair wins over --params
        {"prefill_safety": 3.0, "skip_blocked": True},  # the label's --params win over the name's
    ]
    with pytest.raises(InvalidArgument, match="--params for fcfs-full"):
        parse_policy_specs("vllm,layerkv", {"fcfs-full": {}})
