"""``lambda-split eavesdrop`` end to end: the real server on loopback, real packets, every mode.

The suite is itself tested both ways: on the product it passes (exit 0) with every
positive control firing; with a deliberately leaky or downgraded transport it fails
(exit 1) and says why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from secure_channel import Request, Response, Stream, Transport
from threat_model.capture import read_pcap
from threat_model.report import render_text
from threat_model.suite import SuiteOptions, add_arguments, run_eavesdrop, run_from_args

ENCRYPTED = ("tls", "aesgcm", "tls+aesgcm")
PROMPT = "My doctor in Paris says I have the flu."


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a shared 2-core machine, OpenMP threads spinning at barriers slow small models down
    by 10-100x whenever another process holds a core; one thread is as fast and stays fast."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_json(
    capsys: pytest.CaptureFixture[str], model: str = "tiny-random-llama", **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    code = run_eavesdrop(as_json=True, model=model, progress=quiet, **kwargs)
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line"
    report: dict[str, Any] = json.loads(out)
    return code, report


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("eavesdrop")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_eavesdrop(
            security="all",
            out=str(out),
            as_json=True,
            model="tiny-random-llama",
            progress=quiet,
            prompt=PROMPT,
        )
    assert stdout.getvalue().count("\n") == 1, "--json prints exactly one line"
    return code, json.loads(stdout.getvalue()), out, stdout.getvalue()


def test_every_mode_passes_the_policy_and_every_control_fires(
    full_run: tuple[int, dict[str, Any], Path, str],
) -> None:
    code, report, _, _ = full_run
    assert code == 0, report["policy"]["failures"]
    assert report["policy"] == {"passed": True, "failures": []}
    assert report["modes"] == ["plain", *ENCRYPTED]
    assert report["capture_method"] in (["af_packet"], ["relay"])
    for mode, entry in report["results"].items():
        llm, diffusion = entry["llm"], entry["diffusion"]
        assert llm["detectors"]["text"] == llm["detectors"]["token_ids"] == 0, mode
        assert diffusion["detectors"]["text"] == diffusion["detectors"]["pixels"] == 0, mode
        assert all(c["passed"] for c in llm["checks"] + diffusion["checks"]), mode
        assert llm["traffic"]["prompt_length"]["inferable"], "residual leak: the prefill size"
        assert llm["traffic"]["output_length"]["exact_rate"] == 1.0, "residual leak: the step count"
        assert not llm["traffic"]["token_lengths"]["inferable"], "no Weiss et al. side channel"
    plain = report["results"]["plain"]
    assert plain["llm"]["detectors"]["hidden_states"] > 0 and plain["llm"]["frames_decoded"] > 0
    assert plain["llm"]["attacks"]["inversion"]["accuracy"] == 1.0
    assert plain["llm"]["attacks"]["tail_replay"]["accuracy"] == 1.0
    assert plain["diffusion"]["detectors"]["latents"] > 0
    assert len(plain["diffusion"]["latent_attack"]) == 4  # one SSIM per captured step
    for mode in ENCRYPTED:
        llm, diffusion = report["results"][mode]["llm"], report["results"][mode]["diffusion"]
        assert llm["detectors"]["hidden_states"] == llm["frames_decoded"] == 0
        assert llm["attacks"]["inversion"]["recovered"] == llm["attacks"]["tail_replay"]["recovered"] == 0
        assert diffusion["detectors"]["latents"] == diffusion["frames_decoded"] == 0
    assert report["results"]["aesgcm"]["llm"]["wire"]["sealed_records"]["c2s"] > 0
    assert report["results"]["tls"]["llm"]["wire"]["tls_records"]
    controls = {c["control"]: c["fired"] for c in report["controls"]}
    assert controls and all(controls.values())
    assert {"cloud-prompt", "upload-token-ids-int32", "upload-image-png", "upload-image-rgb"} <= set(controls)
    for mode in ("plain", *ENCRYPTED):  # the curious server, from what it received in each mode
        view = report["server_view"][mode]
        assert view["inversion_accuracy"] == view["tail_replay_accuracy"] == 1.0, mode
        # plain: the four stream sessions and the HTTP one
        assert view["all_prompts_inverted"] and view["prompts"] == (5 if mode == "plain" else 1), mode
        low, high = view["inversion_forwards_per_token"]
        assert 0 < low <= high, mode
    for mode, entry in report["results"].items():  # both paths of the client ran and were judged
        assert {k: r["transport"] for k, r in entry.items()} == {
            "llm": "stream", "llm-http": "http", "diffusion": "stream", "diffusion-http": "http"
        }, mode  # fmt: skip
        assert all(c["passed"] for r in entry.values() for c in r["checks"]), mode
        visible = entry["llm"]["wire"]["visible_as"]
        assert ("websocket" in visible) == (mode in ("plain", "aesgcm", "plain (control)")), (mode, visible)
    masked = "plain: hidden states found inside the masked client-to-server WebSocket frames (control)"
    assert masked in {c["check"] for c in plain["llm"]["checks"]}
    assert plain["llm"]["detectors"]["hidden_in_masked_frames"] > 0
    assert plain["llm-http"]["attacks"]["inversion"]["accuracy"] == 1.0
    aesgcm = report["results"]["aesgcm"]["llm"]["wire"]
    assert aesgcm["sealed_records"]["c2s"] >= aesgcm["websocket_messages"]["c2s binary"] > 0
    for mode, entry in report["results"].items():  # completeness proven, with the counters side by side
        for kind in ("llm", "llm-http", "diffusion", "diffusion-http"):
            complete = entry[kind]["completeness"]
            assert complete["complete"], (mode, kind)
            for session in complete["sessions"]:
                assert session["connections"] and not session["elsewhere"]
                assert sum(c["client_sent"] for c in session["connections"]) == session["transport_sent"]
                for c in session["connections"]:
                    assert c["captured_c2s"] == c["client_sent"] > 0
                    assert c["captured_s2c"] - c["unread_after_close"] == c["client_received"] > 0
        if mode != "plain":
            names = {c["check"] for c in entry["llm"]["checks"]}
            assert any(name.startswith("wire allowlist") for name in names), mode
    assert any("NO confidentiality" in w for w in report["warnings"])


def test_the_sweep_covers_depths_wires_and_attacks(full_run: tuple[int, dict[str, Any], Path, str]) -> None:
    sweep = full_run[1]["sweep"]
    assert sweep["depths"] == [1, 2, 4, 6]
    cells = {(r["attack"], r["wire"], r["depth"]) for r in sweep["rows"]}
    assert len(cells) == 4 * 4 * 4
    exact = [r for r in sweep["rows"] if r["attack"] in ("inversion", "tail_replay")]
    assert all(r["accuracy"] == 1.0 for r in exact), "quantising the wire does not stop the exact attacks"


def test_outputs_are_written(full_run: tuple[int, dict[str, Any], Path, str]) -> None:
    _, report, out, _ = full_run
    files = report["files"]
    assert json.loads((out / "report.json").read_text())["policy"]["passed"] is True
    markdown = (out / "report.md").read_text()
    assert "Policy passed" in markdown and "recovery_vs_depth.png" in markdown
    assert "| plain (stream) |" in markdown and "| plain (http) |" in markdown
    assert (out / "recovery_vs_depth.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    names = {Path(p).name for p in files["pcaps"]}
    for mode in ("plain", *ENCRYPTED):
        assert f"llm-{mode}-0.pcap" in names and f"diffusion-{mode}-0.pcap" in names
        assert f"llm-{mode}-http-0.pcap" in names and f"diffusion-{mode}-http-0.pcap" in names
    assert "control-cloud-prompt.pcap" in names
    for path in files["pcaps"]:
        packets = list(read_pcap(path))
        assert packets and all(frame for _, frame in packets), path
    text = render_text(report)
    assert "POLICY PASSED" in text and "WARNING: plain mode gives NO confidentiality" in text


class LeakyTransport(Transport):
    """A 'debug' transport that adds the prompt to every request, and to the stream's upgrade, as a header."""

    def __init__(self, inner: Transport, secret: str) -> None:
        self.inner, self.secret = inner, secret
        self.security, self.stats = inner.security, inner.stats

    def exchange(self, request: Request) -> Response:
        headers = {**request.headers, "x-debug-prompt": self.secret}
        return self.inner.exchange(Request(request.method, request.path, request.content, headers))

    def open_stream(self, path: str, headers: Mapping[str, str] | None = None) -> Stream:
        return self.inner.open_stream(path, {**(headers or {}), "x-debug-prompt": self.secret})

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize(
    ("security", "options", "failure"),
    [
        ("tls", {"downgrade_to_plain": True}, "tls/llm: no plaintext hidden-state windows"),
        ("aesgcm", {"downgrade_to_plain": True}, "aesgcm/llm: no frame decodes"),
        pytest.param(
            "plain",
            {"transport_wrapper": lambda t: LeakyTransport(t, PROMPT)},
            "plain/llm: no prompt or output text",  # the stream's upgrade (and llm-http's requests)
            # the prompt on the upgrade fails every run in test_mutations.py (StreamLeak "upgrade")
            marks=pytest.mark.exhaustive,
        ),
    ],
)
def test_a_leak_fails_the_policy(
    capsys: pytest.CaptureFixture[str], security: str, options: dict[str, Any], failure: str
) -> None:
    code, report = run_json(
        capsys,
        security=security,
        out=None,
        prompt=PROMPT,
        diffusion=False,
        sweep=False,
        sessions=1,
        **options,
    )
    assert code == 1
    assert report["policy"]["passed"] is False
    assert any(f.startswith(failure) for f in report["policy"]["failures"]), report["policy"]["failures"]


def test_the_relay_capture_gives_the_same_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(capsys, security="tls+aesgcm", out=None, capture="relay", sweep=False, sessions=1)
    assert code == 0, report["policy"]["failures"]
    assert report["capture_method"] == ["relay"]
    assert any("relay" in w for w in report["warnings"])
    # plain was not asked for, so it ran as the control: hidden states and latents must show
    control = report["results"]["plain (control)"]
    assert (
        control["llm"]["detectors"]["hidden_states"] > 0 and control["diffusion"]["detectors"]["latents"] > 0
    )
    assert report["results"]["tls+aesgcm"]["llm"]["detectors"]["hidden_states"] == 0


def test_command_line_options_map_onto_the_suite() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--security", "tls", "--json", "--no-diffusion", "--depths", "1,3", "--sweep-wires", "int8"]
    )
    assert (args.security, args.as_json, args.diffusion, args.depths, args.sweep_wires) == (
        "tls",
        True,
        False,
        (1, 3),
        ("int8",),
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep-wires", "fp8"])
    with pytest.raises(TypeError):
        SuiteOptions(**{"no_such_option": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_new_tokens"):
        SuiteOptions(max_new_tokens=1)
    assert callable(run_from_args)


@pytest.mark.heavy
def test_smollm2_plain_capture_inverts_a_short_prompt_and_replays_the_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The attacks on a real model. One session on the default path is all they read: the traffic
    analysis over several sessions, the HTTP path and the curious server are the tiny model's
    (full_run above)."""
    code, report = run_json(
        capsys,
        security="plain",
        out=None,
        model="smollm2-135m",
        prompt="I live in Paris.",
        max_new_tokens=4,
        diffusion=False,
        sweep=False,
        sessions=1,
        transports=("stream",),
    )
    assert code == 0, report["policy"]["failures"]
    attacks = report["results"]["plain"]["llm"]["attacks"]
    assert attacks["inversion"]["accuracy"] == 1.0
    assert attacks["tail_replay"]["accuracy"] == 1.0
