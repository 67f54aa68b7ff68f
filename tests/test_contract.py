"""The request contract's limits: a request asking for what no worker should do is refused when it is made."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from persona.contract import (
    MAX_NEW_TOKENS,
    MAX_SEED,
    GenerationRequest,
    SamplingOverrides,
)


def test_sampling_at_its_limits_is_accepted():
    at_limits = SamplingOverrides(max_new_tokens=MAX_NEW_TOKENS, top_p=1.0, repetition_penalty=0.5,
                                  stop=["x"] * 16, seed=MAX_SEED)
    assert (at_limits.max_new_tokens, at_limits.top_p, at_limits.repetition_penalty) == (MAX_NEW_TOKENS, 1.0, 0.5)
    assert at_limits.stop == ["x"] * 16 and at_limits.seed == MAX_SEED


@pytest.mark.parametrize(("asked", "refused_at", "because"), [
    # one reply of a hundred thousand tokens would hold a worker's row for minutes
    pytest.param({"max_new_tokens": MAX_NEW_TOKENS + 1}, ("max_new_tokens",), "less_than_equal", id="too-many-tokens"),
    pytest.param({"max_new_tokens": 0}, ("max_new_tokens",), "greater_than_equal", id="no-tokens"),
    pytest.param({"top_p": 0.0}, ("top_p",), "greater_than", id="top_p-keeps-nothing"),
    pytest.param({"repetition_penalty": 0.4}, ("repetition_penalty",), "greater_than_equal", id="penalty-rewards-repeats"),
    # an empty stop string would end every reply at its first token
    pytest.param({"stop": [""]}, ("stop", 0), "string_too_short", id="empty-stop-string"),
    pytest.param({"stop": ["x"] * 17}, ("stop",), "too_long", id="seventeen-stop-strings"),
    pytest.param({"seed": MAX_SEED + 1}, ("seed",), "less_than_equal", id="seed-past-64-bits"),
])
def test_sampling_past_its_limits_is_refused(asked, refused_at, because):
    with pytest.raises(ValidationError) as refused:
        SamplingOverrides(**asked)
    [error] = refused.value.errors()
    assert (error["loc"], error["type"]) == (refused_at, because)


def test_a_misspelt_sampling_field_is_refused_not_ignored():
    """A caller who writes "temperatur" would otherwise get the persona's default temperature
    and never learn why the setting did nothing."""
    with pytest.raises(ValidationError) as refused:
        GenerationRequest.from_json('{"persona": "p", "sampling": {"temperatur": 0.7}}')
    [error] = refused.value.errors()
    assert (error["loc"], error["type"]) == (("sampling", "temperatur"), "extra_forbidden")
