"""Per-part GGUF loading: a part dequantises only its own tensors, and gets what transformers gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lambda_split import SplitSpec, fingerprint, load_parts, resolve
from lambda_split._gguf import _GGUFTensors
from lambda_split._models import _smollm2_path, _whole_file_gguf, meta_model

ROOT = Path(__file__).resolve().parents[1]
# Computed with the whole-file loader before per-part loading existed: the stored bytes hashed
# per parameter name, so a wrong name mapping changes it.
SMOLLM2_TRUNK_2_28 = "sha256:237c63cbee4ab17daf72211fad129f577a32fffc5719e657cfea5b02480f917a"


@pytest.fixture(scope="module")
def smollm2_file() -> _GGUFTensors:
    checkpoint = resolve("smollm2-135m")
    return _GGUFTensors(_smollm2_path(), checkpoint.config, meta_model(checkpoint.config).state_dict())


def test_every_parameter_has_a_stored_tensor_but_the_tied_head(smollm2_file: _GGUFTensors) -> None:
    names = set(meta_model(smollm2_file.config).state_dict())
    assert names - set(smollm2_file.names) == {"lm_head.weight"}
    assert len(set(smollm2_file.names.values())) == len(smollm2_file.names)  # one tensor per parameter


def test_a_part_dequantises_only_its_own_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = resolve("smollm2-135m")
    seen: list[str] = []
    original = _GGUFTensors._dequantise

    def spy(self: _GGUFTensors, gguf_name: str) -> torch.Tensor:
        seen.append(gguf_name)
        return original(self, gguf_name)

    monkeypatch.setattr(_GGUFTensors, "_dequantise", spy)
    spec = SplitSpec.parse("2:-2", 30)
    load_parts(checkpoint, spec, ("trunk",))
    assert {name.split(".")[1] for name in seen} == {str(i) for i in range(2, 28)}
    seen.clear()
    device = load_parts(checkpoint, spec, ("head", "tail"))
    blocks = {name.split(".")[1] for name in seen if name.startswith("blk.")}
    assert blocks == {"0", "1", "28", "29"}
    assert seen.count("token_embd.weight") == 1  # the tied head shares the embedding, read once
    assert device.tail is not None and device.head is not None
    head_weight = device.tail.lm_head.get_parameter("weight")
    assert head_weight.data_ptr() == device.head.embed_tokens.get_parameter("weight").data_ptr()


def test_the_fingerprint_is_what_the_whole_file_loader_gave() -> None:
    assert fingerprint(resolve("smollm2-135m"), (2, 28)) == SMOLLM2_TRUNK_2_28


@pytest.mark.heavy
def test_per_part_tensors_equal_transformers_whole_file_loading() -> None:
    checkpoint = resolve("smollm2-135m")
    names = list(meta_model(checkpoint.config).state_dict())
    expected = _whole_file_gguf(checkpoint).read_tensors(names)
    got = checkpoint.read_tensors(names)
    assert got.keys() == expected.keys()
    for name in names:
        assert got[name].dtype == expected[name].dtype == torch.float32, name
        assert torch.equal(got[name], expected[name]), name


def _peak_rss(*runs: tuple[str, ...]) -> list[dict[str, float]]:
    """One fresh process per run (a peak never goes down), all started at once: each measures its own
    high-water mark, so they need not wait for one another (three imports of torch, on two cores)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "lambda_split._gguf_rss", "smollm2-135m", "2:-2", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for args in runs
    ]
    results: list[dict[str, float]] = []
    try:
        for process, args in zip(processes, runs, strict=True):
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, (args, err)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


@pytest.mark.heavy
def test_each_side_peaks_well_below_the_whole_file_loading() -> None:
    parts = ("head,tail", "trunk")
    whole, *own_runs = _peak_rss(("head,tail", "--whole-file"), *((p,) for p in parts))
    whole_loading = whole["peak_rss_mib"] - whole["peak_rss_before_loading_mib"]
    for parts_loaded, own in zip(parts, own_runs, strict=True):
        loading = own["peak_rss_mib"] - own["peak_rss_before_loading_mib"]
        # Loading costs little more than the float32 weights the part keeps ...
        assert loading < own["weights_kept_mib"] + 128, (parts_loaded, own)
        # ... which for the device side is a fraction of dequantising the whole file.
        if parts_loaded == "head,tail":
            assert loading < 0.4 * whole_loading, (own, whole)
