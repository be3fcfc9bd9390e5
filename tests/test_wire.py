"""The shared proto conversions: domain values survive the wire, and bad wire values are named."""

from __future__ import annotations

import math

import pytest

from common.errors import InvalidArgument
from common.proto.layerkv.v1 import types_pb2
from common.types import CostModel, FinishReason, KVGeometry, SamplingParams
from common.wire import (
    cost_model_from_proto,
    cost_model_to_proto,
    finish_reason_to_proto,
    geometry_from_proto,
    geometry_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)


def test_domain_values_survive_the_wire() -> None:
    geometry = KVGeometry(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype_bytes=2)
    assert geometry_from_proto(geometry_to_proto(geometry)) == geometry
    cost = CostModel(d2h_bytes_per_s=2e10, h2d_bytes_per_s=3e10, prefill_per_token_s=2e-5,
                     prefill_per_token2_s=1e-9, decode_base_s=0.02, correction=1.3)
    assert cost_model_from_proto(cost_model_to_proto(cost)) == cost
    sampling = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.75, top_k=3, seed=11,
                              stop_token_ids=(2, 9), ignore_eos=True)
    assert sampling_from_proto(sampling_to_proto(sampling), default_max_tokens=16) == sampling
    assert finish_reason_to_proto(FinishReason.LENGTH) == types_pb2.FINISH_REASON_LENGTH
    assert finish_reason_to_proto(None) == types_pb2.FINISH_REASON_UNSPECIFIED


def test_unset_wire_fields_take_the_defaults() -> None:
    assert cost_model_from_proto(types_pb2.CostModel()) == CostModel(
        prefill_per_token_s=0.0, decode_base_s=0.0)  # bandwidths and correction never become 0
    sampling = sampling_from_proto(types_pb2.SamplingParams(), default_max_tokens=16)
    assert (sampling.max_tokens, sampling.top_p, sampling.seed) == (16, 1.0, None)


@pytest.mark.parametrize(("field", "value", "named"), [
    ("temperature", math.nan, "temperature"), ("top_p", math.inf, "top_p"), ("top_p", 1.5, "top_p"),
    ("temperature", -1.0, "temperature")])
def test_bad_wire_sampling_is_invalid_argument_naming_the_field(field: str, value: float, named: str) -> None:
    with pytest.raises(InvalidArgument, match=named):
        sampling_from_proto(types_pb2.SamplingParams(**{field: value}), default_max_tokens=16)
