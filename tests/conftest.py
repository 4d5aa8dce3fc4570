from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lambda_split import Checkpoint, resolve
from lambda_split._models import preload


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
