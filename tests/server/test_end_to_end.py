"""serve + client over a real loopback socket, in every mode."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from lambda_split import (
    Checkpoint,
    FingerprintMismatch,
    GenerationConfig,
    ServerError,
    SplitClient,
    encode_prompts,
)
from secure_channel import AuthenticationError, connect_transport
from tests.conftest import monolithic
from tests.helpers import reference_tokens
from tests.server.conftest import MODES, LiveServer

GREEDY = GenerationConfig(max_new_tokens=32)


def connect(
    server: LiveServer, model: Checkpoint, keys: Path | None = None, wire: str = "fp32"
) -> SplitClient:
    keys_dir = None if server.mode == "plain" else (keys or server.keys)
    return SplitClient.connect(server.url, security=server.mode, keys=keys_dir, model=model, wire=wire)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_monolithic_tokens(
    live: dict[str, LiveServer], tiny: Checkpoint, mode: str
) -> None:
    with connect(live[mode], tiny) as client:
        ids, mask = encode_prompts(client.tokenizer, ["hello there", "x"], chat=True)
        expected = reference_tokens(monolithic(tiny), ids, mask, 32, client.tokenizer.eos_token_id)
        assert client.generate_ids(ids, mask, GREEDY).token_ids == expected
        assert client.transport.stats.bytes_sent > 0 and client.transport.stats.bytes_received > 0


def test_eight_concurrent_clients_each_get_their_solo_output(
    live: dict[str, LiveServer], tiny: Checkpoint
) -> None:
    prompts = [f"prompt number {i} " * (i + 1) for i in range(8)]
    with connect(live["tls+aesgcm"], tiny) as client:
        solo = [client.generate(p, GREEDY).token_ids[0] for p in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            with connect(live["tls+aesgcm"], tiny) as own:
                results[index] = own.generate(prompts[index], GREEDY).token_ids[0]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert [results[i] for i in range(8)] == solo


def test_client_refuses_a_server_with_another_model(live: dict[str, LiveServer], tiny: Checkpoint) -> None:
    import dataclasses

    forged = dataclasses.replace(tiny, raw_tensor_bytes=lambda name: b"other weights")
    with pytest.raises(FingerprintMismatch):
        connect(live["plain"], forged)


def test_client_refuses_a_mode_mismatch(live: dict[str, LiveServer], tiny: Checkpoint) -> None:
    with pytest.raises(AuthenticationError):
        SplitClient.connect(
            live["tls"].url.replace("https", "https"),
            security="tls+aesgcm",
            keys=live["tls"].keys,
            model=tiny,
        ).close()


@pytest.mark.parametrize("kind", ["http", "stream"])
def test_sessions_are_bound_to_the_authenticated_client(
    live: dict[str, LiveServer], tiny: Checkpoint, second_client: Path, kind: str
) -> None:
    """Bob, authenticated as himself, cannot step or close Alice's session (on either path)."""
    from lambda_split import RemoteTrunk, StreamLink, make_link
    from lambda_split.protocol import Encoding, FrameKind, StreamOp, encode_frame

    for mode in ("tls", "aesgcm", "tls+aesgcm"):
        held = live[mode].service.open_sessions
        with (
            connect_transport(live[mode].url, mode, keys_dir=live[mode].keys) as alice,  # type: ignore[arg-type]
            connect_transport(live[mode].url, mode, keys_dir=second_client) as bob,  # type: ignore[arg-type]
        ):
            own, other = make_link(alice, kind), make_link(bob, kind)  # type: ignore[arg-type]
            session = RemoteTrunk(own, Encoding.FP32)
            if isinstance(other, StreamLink):
                # A hostile client skips the link's own check that a session was opened on its
                # stream, so that the server's ownership check is what is tested here: a handle
                # names only sessions of its own stream (0 is never one), and a STEP frame that
                # names alice's session by its id is refused like a missing one.
                mine = other.open("fp32")["session_id"]
                other._sessions[session.session_id] = (other._generation, 0)
                named = encode_frame(
                    FrameKind.LLM_STEP,
                    bytes.fromhex(session.session_id),
                    0,
                    {"hidden": (torch.zeros(1, 1, tiny.config.hidden_size), Encoding.FP32)},
                )
                with pytest.raises(ServerError) as refused:
                    other._call(StreamOp.STEP, named)
                assert refused.value.status == 404
            stolen = RemoteTrunk.__new__(RemoteTrunk)
            stolen.__dict__.update(session.__dict__, link=other)
            hidden = torch.zeros(1, 1, tiny.config.hidden_size)
            try:
                with pytest.raises(ServerError) as refused:
                    stolen(hidden, torch.ones(1, 1))
                assert refused.value.status == 404
                with pytest.raises(ServerError) as refused:
                    stolen.close()
                assert refused.value.status == 404
                session(hidden, torch.ones(1, 1))  # alice's session is untouched and still hers
            finally:
                session.close()
                if isinstance(other, StreamLink):
                    other.close(mine)
                for link in (own, other):
                    if isinstance(link, StreamLink):
                        link.shutdown()
        assert live[mode].service.open_sessions == held


def test_llm_client_refuses_a_diffusion_server(tiny: Checkpoint, tmp_path: Path) -> None:
    from lambda_split import LocalTransport, ProtocolMismatch
    from lambda_split.diffusion import load_diffusion_service

    service, info = load_diffusion_service("tiny-random-sd", security="plain")
    with pytest.raises(ProtocolMismatch, match="diffusion"):
        SplitClient.from_transport(LocalTransport(service, info), tiny)
