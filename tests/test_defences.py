"""Uplink defences: off by default, and when on they change exactly what crosses the uplink."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lambda_split.cli as cli
from lambda_split import Checkpoint, GenerationConfig, LocalTransport, SplitClient
from lambda_split._defences import Defence, add_noise, defended, quantise_blockwise
from lambda_split.protocol import Encoding, decode_frame
from secure_channel import Request, Response
from tests.helpers import local_client


class SpyTransport(LocalTransport):
    """The local trunk, keeping every uplink hidden state the client sent."""

    sent: list[torch.Tensor]
    encodings: list[tuple[Encoding, Encoding, int]]  # (uplink, downlink, step frame bytes)

    def exchange(self, request: Request) -> Response:
        response = super().exchange(request)
        if request.path.endswith("/step"):
            step = decode_frame(request.content)
            self.sent.append(step.tensors["hidden"])
            back = decode_frame(response.content).encodings["hidden"]
            self.encodings.append((step.encodings["hidden"], back, len(request.content)))
        return response


def spied(tiny: Checkpoint, defence: Defence | None = None) -> tuple[SplitClient, list[torch.Tensor]]:
    client, _service = local_client(tiny, "2:-2")
    inner = client.transport
    assert isinstance(inner, LocalTransport)
    spy = SpyTransport(inner.service, inner.info)
    spy.sent, spy.encodings = [], []
    kwargs: dict[str, Any] = {} if defence is None else {"defence": defence}
    return SplitClient(spy, client.model, client.info, **kwargs), spy.sent


def run(client: SplitClient) -> tuple[torch.Tensor, list[int]]:
    """The head's own prefill output for the prompt, and the generated tokens."""
    ids, mask = cli_prompt(client)
    result = client.generate_ids(ids, mask, GenerationConfig(max_new_tokens=4, stop_on_eos=False))
    with torch.inference_mode():
        return client.head(ids, mask), result.token_ids[0]


def cli_prompt(client: SplitClient) -> tuple[torch.Tensor, torch.Tensor]:
    from lambda_split import encode_prompts

    return encode_prompts(client.tokenizer, ["My PIN is 4921."], chat=False)


def test_default_sends_exactly_the_heads_output(tiny: Checkpoint) -> None:
    client, sent = spied(tiny)
    assert client.defence is None
    clean, _ = run(client)
    assert torch.equal(sent[0], clean)
    assert len(sent) == 4


def test_noise_is_isotropic_and_relative_to_each_positions_rms(tiny: Checkpoint) -> None:
    client, sent = spied(tiny, Defence("noise", sigma=0.5, seed=1))
    clean, _ = run(client)
    residual = sent[0] - clean  # (1, T, d)
    rms = clean.pow(2).mean(-1, keepdim=True).sqrt()
    ratio = (residual / rms).flatten()
    assert abs(float(ratio.std()) - 0.5) < 0.05
    assert abs(float(ratio.mean())) < 0.05
    # and a decode step's single position carries noise too
    assert len(sent) == 4 and sent[1].shape[1] == 1


def test_noise_is_fresh_per_session_unless_seeded() -> None:
    x = torch.randn(1, 3, 64)
    first, second = Defence("noise", sigma=0.1).session(), Defence("noise", sigma=0.1).session()
    assert not torch.equal(first(x), second(x))
    seeded = Defence("noise", sigma=0.1, seed=3)
    assert torch.equal(seeded.session()(x), seeded.session()(x))


@pytest.mark.parametrize(("spec", "levels"), [("quant:int4", 7), ("quant:int2", 1)])
def test_quantisation_sends_the_dequantised_blocks(tiny: Checkpoint, spec: str, levels: int) -> None:
    client, sent = spied(tiny, Defence.parse(spec))
    clean, _ = run(client)
    assert torch.equal(sent[0], quantise_blockwise(clean, levels))
    blocks = sent[0].reshape(-1, 64)
    for block in blocks:
        scale = float(block.abs().max()) / levels
        codes = block / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert len(set(codes.round().tolist())) <= 2 * levels + 1


@pytest.mark.parametrize(
    ("spec", "uplink", "payload"), [("quant:int4", Encoding.INT4, 34), ("quant:int2", Encoding.INT2, 18)]
)
def test_quantisation_crosses_the_uplink_in_its_own_encoding_and_the_downlink_at_the_wire(
    tiny: Checkpoint, spec: str, uplink: Encoding, payload: int
) -> None:
    client, _sent = spied(tiny, Defence.parse(spec))
    run(client)
    encodings = client.transport.encodings  # type: ignore[attr-defined]
    assert {(up, down) for up, down, _ in encodings} == {(uplink, Encoding.FP32)}
    # a decode step of the 64-wide tiny model: 5 bytes of frame header, 6 of tensor header ("hidden"
    # from the static table 1, encoding 1, rank 1, dims 1 + 1 + 1: 64 is a 1-byte varint)
    assert encodings[-1][2] == 5 + 6 + payload


def test_quantise_blockwise_error_bound_and_padding() -> None:
    # A block's step is its absmax / levels rounded up to fp16 (the wire's scale), at most one fp16
    # ulp (2**-10 relative) above the exact step; the error is at most half a step. (A bound without
    # that ulp failed about one run in 25.)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        x = torch.randn(2, 3, 100, generator=generator)  # 100 is not a multiple of the block
        for levels in (127, 7, 1):
            q = quantise_blockwise(x, levels)
            assert q.shape == x.shape
            bound = float(x.abs().max()) / (2 * levels) * (1 + 2**-10) + 1e-6
            assert float((q - x).abs().max()) <= bound
    assert torch.equal(quantise_blockwise(torch.zeros(1, 64), 7), torch.zeros(1, 64))


def test_defended_wraps_only_when_a_defence_is_set() -> None:
    calls: list[torch.Tensor] = []

    def trunk(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls.append(hidden)
        return hidden

    assert defended(trunk, None) is trunk
    x = torch.randn(1, 2, 64)
    defended(trunk, Defence("noise", sigma=1.0, seed=0))(x, torch.ones(1, 2))
    expected = add_noise(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(calls[-1], expected)


@pytest.mark.parametrize(
    "bad", ["noise", "noise:x", "noise:0", "noise:-1", "noise:inf", "quant:int3", "quant", "shuffle", ""]
)
def test_bad_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Defence.parse(bad)


def test_cli_parses_the_option_and_refuses_bad_ones(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    base = ["generate", "--server", "http://127.0.0.1:1", "--security", "plain", "--model", "m", "p"]
    assert parser.parse_args(base).defence is None
    assert parser.parse_args([*base, "--defence", "noise:0.1"]).defence == Defence("noise", sigma=0.1)
    assert parser.parse_args([*base, "--defence", "quant:int2"]).defence == Defence("quant", levels="int2")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*base, "--defence", "shuffle:1"])
    assert exc.value.code == 2
    assert "unknown defence" in capsys.readouterr().err


def test_noise_scales_with_each_rows_own_rms() -> None:
    x = torch.randn(1, 2, 4096)
    x[0, 1] *= 100  # a loud position (like a first-token attention sink) beside a quiet one
    residual = add_noise(x, 0.2, torch.Generator().manual_seed(0)) - x
    for row in range(2):
        rms = float(x[0, row].pow(2).mean().sqrt())
        assert abs(float(residual[0, row].std()) / rms - 0.2) < 0.01


def test_generate_json_names_the_defence(tiny: Checkpoint) -> None:
    for defence, name in ((None, None), (Defence("quant", levels="int4"), "quant:int4")):
        client, _sent = spied(tiny, defence)
        ids, mask = cli_prompt(client)
        result = client.generate_ids(ids, mask, GenerationConfig(max_new_tokens=2))
        assert cli._result_json(result, client, client.wire_stats)["stats"]["defence"] == name
