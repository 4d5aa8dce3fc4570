"""The raw event stream as ``curl -N`` sees it, and errors in OpenAI's shape."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from lambda_split import GenerationConfig


def curl(url: str, body: dict[str, Any], *headers: str) -> str:
    command = ["curl", "-sS", "-N", "--max-time", "120", url, "-H", "Content-Type: application/json"]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run(
        [*command, "-d", json.dumps(body)], capture_output=True, text=True, timeout=150, check=True
    )
    return done.stdout


def test_curl_sees_role_deltas_finish_usage_done(make_local: Callable[..., Any]) -> None:
    local, engine = make_local(conversations=0)
    reference = engine.client.generate("Hi", GenerationConfig(max_new_tokens=5))
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw = curl(local.url + "/v1/chat/completions", body)
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events[:-1])
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-2]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-2]
    assert content and all(c["choices"][0]["finish_reason"] is None for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == reference.texts[0]
    last_choice, usage = chunks[-2], chunks[-1]
    assert last_choice["choices"][0]["finish_reason"] == "length"
    assert last_choice["lambda_split"]["bytes_sent"] > 0 and last_choice["lambda_split"]["tokens_per_s"] > 0
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_without_include_usage_there_is_no_usage_chunk(make_local: Callable[..., Any]) -> None:
    local, _ = make_local(conversations=0)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    events = [e for e in curl(local.url + "/v1/chat/completions", body).split("\n\n") if e]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)


REFUSED = [
    ({"n": 2}, "n", "unsupported_parameter"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "tools",
        "unsupported_parameter",
    ),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"top_p": "high"}, "top_p", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"messages": []}, "messages", "invalid_request"),
    (
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
        "messages[0]",
        "unsupported_parameter",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
        "unsupported_parameter",
    ),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"max_tokens": 10**9}, "max_tokens", "context_length_exceeded"),
]


@pytest.mark.parametrize(("extra", "param", "code"), REFUSED)
def test_refusals_are_400_in_openai_shape(
    make_local: Callable[..., Any], extra: dict[str, Any], param: str, code: str
) -> None:
    local, _ = make_local()
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    reply = httpx.post(local.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"]


def test_openai_client_raises_its_own_bad_request_error(make_local: Callable[..., Any]) -> None:
    local, _ = make_local()
    with (
        openai.OpenAI(base_url=local.url + "/v1", api_key="unused", max_retries=0) as oai,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "n"


def test_api_key_is_required_when_set(make_local: Callable[..., Any]) -> None:
    local, _ = make_local(api_key="s3cret")
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        reply = httpx.post(local.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(local.url + "/v1/models", timeout=10).status_code == 401
    with (
        openai.OpenAI(base_url=local.url + "/v1", api_key="wrong") as oai,
        pytest.raises(openai.AuthenticationError),
    ):
        oai.models.list()
    with openai.OpenAI(base_url=local.url + "/v1", api_key="s3cret") as oai:
        reply = oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
        )
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    assert httpx.get(local.url + "/", timeout=10).status_code == 200  # the page itself asks for the key


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"[]", "headers": {"content-type": "application/json"}}, 400, "invalid_request"),
        (
            {"content": b"{}", "headers": {"content-type": "application/json", "host": "evil.example:8080"}},
            403,
            "forbidden_host",
        ),
    ],
)
def test_malformed_requests(
    make_local: Callable[..., Any], request_args: dict[str, Any], status: int, code: str
) -> None:
    local, _ = make_local()
    reply = httpx.post(local.url + "/v1/chat/completions", timeout=30, **request_args)
    assert (reply.status_code, reply.json()["error"]["code"]) == (status, code)


def test_unknown_paths_answer_in_openai_shape(make_local: Callable[..., Any]) -> None:
    local, _ = make_local()
    reply = httpx.get(local.url + "/v1/embeddings", timeout=10)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
    assert httpx.get(local.url + "/v1/chat/completions", timeout=10).status_code == 405
