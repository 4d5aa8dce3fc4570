"""The real client and trunk server on loopback, captured on the wire, in every security mode.

Plain mode is the in-system positive control: the hidden-state frames are on the wire
and a passive eavesdropper inverts them back to the prompt. Every other mode must show
nothing: no text, no token ids, no hidden-state window, no decodable frame.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from threat_model.attacks import cached_step_fn, invert_prompt, model_order_fn, tail_replay
from threat_model.capture import capture_loopback
from threat_model.detectors import HiddenStateDetector, TextLeakDetector, TokenIdDetector, scan_streams
from threat_model.eavesdrop import plaintext_frames, session_tensors

ls = pytest.importorskip("lambda_split")
pytest.importorskip("server")
MODES = ["plain", "tls", "aesgcm", "tls+aesgcm"]
PROMPT = "My account number is 7731-0042 and my doctor is Dr. Quill"
WIRE = "fp16"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    subprocess.run([sys.executable, "-m", "lambda_split", "keys", "init", str(directory / "k")], check=True)
    return directory / "k"


@pytest.fixture(scope="module")
def servers(keys: Path) -> Iterator[dict[str, tuple[str, int]]]:
    procs = {
        mode: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lambda_split",
                "serve",
                "--model",
                "tiny-random-llama",
                "--split",
                "2:-2",
                "--security",
                mode,
                "--keys",
                str(keys),
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for mode in MODES
    }
    urls: dict[str, tuple[str, int]] = {}

    def wait(mode: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("listening on "):
                url = line.split()[-1]
                urls[mode] = (url, int(url.rsplit(":", 1)[1]))
                return

    waiters = [threading.Thread(target=wait, args=item, daemon=True) for item in procs.items()]
    for waiter in waiters:
        waiter.start()
    deadline = time.monotonic() + 180
    for waiter in waiters:
        waiter.join(max(0.0, deadline - time.monotonic()))
    try:
        if len(urls) != len(MODES):
            pytest.fail(f"servers did not start: {sorted(set(MODES) - set(urls))}")
        yield urls
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)


def run_session(
    mode: str, servers: dict[str, tuple[str, int]], keys: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]:
    """Generate once through a loopback capture; return capture, result, and the tensors exchanged."""
    sent: list[torch.Tensor] = []
    returned: list[torch.Tensor] = []
    original = ls.RemoteTrunk.__call__

    def recording(self: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = original(self, hidden, mask)
        sent.append(hidden.detach().clone())
        returned.append(out.detach().clone())
        return out

    monkeypatch.setattr(ls.RemoteTrunk, "__call__", recording)
    url, port = servers[mode]
    with capture_loopback({port}) as cap:
        target = url.rsplit(":", 1)[0] + f":{cap.client_port(port)}"
        client = ls.SplitClient.connect(
            target, security=mode, keys=keys, model="tiny-random-llama", wire=WIRE
        )
        try:
            result = client.generate(PROMPT, ls.GenerationConfig(max_new_tokens=12, temperature=0.0))
        finally:
            client.close()
    return cap, result, sent, returned


@pytest.mark.heavy
@pytest.mark.parametrize("mode", MODES)
def test_nothing_private_crosses_the_wire(
    mode: str, servers: dict[str, tuple[str, int]], keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap, result, sent, returned = run_session(mode, servers, keys, monkeypatch)
    streams = cap.streams()
    assert streams and all(s.complete for s in streams), cap.describe()
    assert sent and returned
    tokenizer = ls.resolve("tiny-random-llama").tokenizer
    prompt_ids, _ = ls.encode_prompts(tokenizer, [PROMPT], chat=True)
    secrets = [PROMPT] + ([result.texts[0]] if len(result.texts[0]) >= 8 else [])
    content = [TextLeakDetector(secrets), TokenIdDetector([prompt_ids[0].tolist(), result.token_ids[0]])]
    hidden = HiddenStateDetector(sent + returned, WIRE)
    assert scan_streams(content, streams) == []
    frames = plaintext_frames(streams)
    if mode == "plain":  # positive control inside the real system
        assert scan_streams([hidden], streams), "plain mode must show the hidden states"
        assert len(frames) == 2 * len(sent)
    else:
        assert scan_streams([hidden], streams) == []
        assert frames == []


@pytest.mark.heavy
def test_plain_mode_eavesdropper_recovers_prompt_and_answer(
    servers: dict[str, tuple[str, int]], keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap, result, _, _ = run_session("plain", servers, keys, monkeypatch)
    head_out, trunk_out = session_tensors(plaintext_frames(cap.streams()))
    checkpoint = ls.resolve("tiny-random-llama")
    spec = ls.SplitSpec.parse("2:-2", checkpoint.config.num_hidden_layers)
    parts = ls.load_parts(checkpoint, spec, ("head", "trunk", "tail"))
    prompt_ids, _ = ls.encode_prompts(checkpoint.tokenizer, [PROMPT], chat=True)
    replay = tail_replay(trunk_out, parts.tail, prompt_length=prompt_ids.shape[1], truth=result.token_ids[0])
    assert replay.accuracy == 1.0

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return parts.tail(parts.trunk(parts.head(ids)))

    order = model_order_fn(logits, checkpoint.config.vocab_size, checkpoint.tokenizer.bos_token_id)
    inversion = invert_prompt(
        head_out[0],
        None,
        order,
        encoding=WIRE,
        truth=prompt_ids[0].tolist(),
        step_fn=cached_step_fn(parts.head),
        batch_size=64,
    )
    assert inversion.accuracy == 1.0
    assert PROMPT in checkpoint.tokenizer.decode(inversion.recovered)
