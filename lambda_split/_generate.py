"""The device-side decoding loop: head, trunk (anywhere), tail, sample, repeat."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lambda_split._parts import Head, PartState, Tail

#: ``trunk(hidden (B, T, C), mask (B, T)) -> hidden (B, T, C)``, local or remote.
TrunkFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``on_text(row, new_text)``, called as text becomes final.
TextCallback = Callable[[int, str], None]
#: ``on_step()``, called once per decoding step after its tokens are chosen; it may raise to stop.
StepCallback = Callable[[], None]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.temperature not in (0.0, 1.0):
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


@dataclass
class GenerationResult:
    token_ids: list[list[int]]
    texts: list[str]
    time_to_first_token_s: float = 0.0
    elapsed_s: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list)  # per step (B, V), only if requested
    #: per row: "stop" (end of sequence or a stop string) or "length" (max_new_tokens reached)
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(row) for row in self.token_ids)


class _Streamer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 and stop-string prefixes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.emitted = 0

    def text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def stop_index(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop_strings if s in text]
        return min(hits) if hits else None

    def delta(self, text: str, final: bool) -> str:
        ready = len(text)
        if not final:
            if text.endswith("\ufffd"):
                ready = len(text.rstrip("\ufffd"))
            for stop in self.stop_strings:
                for size in range(len(stop) - 1, 0, -1):
                    if text[:ready].endswith(stop[:size]):
                        ready -= size
                        break
        out = text[self.emitted : ready]
        self.emitted = max(self.emitted, ready)
        return out


@torch.inference_mode()
def generate_tokens(
    head: Head,
    trunk: TrunkFn,
    tail: Tail,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    *,
    on_text: TextCallback | None = None,
    keep_logits: bool = False,
    prefill_chunk: int = 0,
    head_state: PartState | None = None,
    tail_state: PartState | None = None,
    on_step: StepCallback | None = None,
) -> GenerationResult:
    """Decode up to ``config.max_new_tokens`` for a left-padded batch.

    Finished rows keep stepping with the pad token, exactly as transformers' generate()
    does, so a batch gives the same tokens as each row would alone. ``prefill_chunk`` (0: off)
    feeds a longer prompt in steps of at most that many tokens; every part keeps a KV cache,
    so the tokens are those of one prefill step.

    ``head_state`` and ``tail_state`` continue a conversation: the parts' KV caches of the tokens
    fed so far, with ``trunk`` the session that holds the same tokens; ``input_ids`` are then only
    the new tokens. Both states are advanced in place. ``on_step`` is called after every step.
    """
    batch = input_ids.shape[0]
    eos_ids = _eos_ids(tokenizer) if config.stop_on_eos else set()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    warpers = config.warpers()
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    head_state = head_state if head_state is not None else head.new_state()
    tail_state = tail_state if tail_state is not None else tail.new_state()
    streamers = [_Streamer(tokenizer, config.stop_strings) for _ in range(batch)]
    rows: list[list[int]] = [[] for _ in range(batch)]
    texts = [""] * batch
    done = [False] * batch
    kept: list[torch.Tensor] = []
    started = time.perf_counter()
    first_token_at = 0.0

    # Text is decoded every step only when something reads it then (streaming, stop strings).
    track_text = on_text is not None or bool(config.stop_strings)
    ids, mask = input_ids, attention_mask
    if prefill_chunk and ids.shape[1] > prefill_chunk:
        last = (ids.shape[1] - 1) // prefill_chunk * prefill_chunk  # the final chunk goes through the loop
        for start in range(0, last, prefill_chunk):
            chunk_ids, chunk_mask = (
                ids[:, start : start + prefill_chunk],
                mask[:, start : start + prefill_chunk],
            )
            hidden = trunk(head(chunk_ids, chunk_mask, head_state), chunk_mask)
            tail(hidden, chunk_mask, tail_state, last_only=True)  # only its KV cache is needed
        ids, mask = ids[:, last:], mask[:, last:]
    for step in range(config.max_new_tokens):
        hidden = head(ids, mask, head_state)  # (B, T, C)
        hidden = trunk(hidden, mask)  # (B, T, C)
        logits = tail(hidden, mask, tail_state, last_only=True)[:, -1, :].float()  # (B, V)
        if keep_logits:
            kept.append(logits.clone())
        next_ids = _choose(logits, ids, warpers, config.temperature, generator)  # (B,)
        if step == 0:
            first_token_at = time.perf_counter() - started
        for row in range(batch):
            if done[row]:
                next_ids[row] = pad_id
                continue
            token = int(next_ids[row])
            rows[row].append(token)
            done[row] = token in eos_ids
            if not track_text:
                continue
            text = streamers[row].text(rows[row])
            cut = streamers[row].stop_index(text) if config.stop_strings else None
            if cut is not None:
                text = text[:cut]
                done[row] = True
            texts[row] = text
            if on_text is not None:
                delta = streamers[row].delta(text, final=done[row] or step == config.max_new_tokens - 1)
                if delta:
                    on_text(row, delta)
        if on_step is not None:
            on_step()
        if all(done):
            break
        ids = next_ids[:, None]  # (B, 1)
        mask = torch.ones_like(ids)
    if not track_text:
        texts = [streamer.text(row) for streamer, row in zip(streamers, rows, strict=True)]
    reasons = ["stop" if finished else "length" for finished in done]
    return GenerationResult(rows, texts, first_token_at, time.perf_counter() - started, kept, reasons)


def _choose(
    logits: torch.Tensor,
    ids: torch.Tensor,
    warpers: LogitsProcessorList,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = warpers(ids, logits)  # type: ignore[arg-type]
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _eos_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, chat: bool, pad_to_multiple_of: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts into a left-padded batch, applying the chat template if asked and available.

    ``pad_to_multiple_of`` left-pads the batch to a multiple of that many tokens, so the prefill
    frame's size shows only a bucket of the prompt length, not the length itself.
    """
    if chat and tokenizer.chat_template:
        texts = [
            str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
            )
            for p in prompts
        ]
        add_special = False
    else:
        texts, add_special = list(prompts), True
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=add_special,
        pad_to_multiple_of=pad_to_multiple_of or None,
    )
    return encoded["input_ids"], encoded["attention_mask"]
