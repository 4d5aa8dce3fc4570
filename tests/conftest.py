from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import AutoModelForCausalLM

from lambda_split import Checkpoint, resolve
from lambda_split._models import preload

# Properties, not timings: on a shared, loaded machine an example may take longer than hypothesis's
# default 200 ms deadline, or generate slowly, and that must not fail the suite (it did:
# test_codec's lying-shape property, 287 ms for one example under load). Tests that pass their own
# @settings inherit these two from the profile.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

# `make test` runs the suite in two pytest-xdist workers, one per core of CI's machine. Each worker
# computes with one torch thread, and so does every process a test starts (servers, the CLI), so
# that two workers do not fight over the two cores with two threads each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def monolithic(checkpoint: Checkpoint) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_config(checkpoint.config)
    model.load_state_dict(checkpoint.read_tensors(model.state_dict().keys()))
    return model.eval()


@pytest.fixture(scope="session")
def tiny() -> Checkpoint:
    return resolve("tiny-random-llama")


@pytest.fixture(scope="session")
def smollm2() -> Checkpoint:
    checkpoint = preload(resolve("smollm2-135m"))
    _ = checkpoint.tokenizer
    return checkpoint
