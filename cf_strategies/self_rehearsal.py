"""Self-rehearsal: replay the champion's own answers when the old data cannot be kept.

Huang et al., ACL 2024, "Mitigating Catastrophic Forgetting in Large Language Models with
Self-Synthesized Rehearsal" (SSR). Before training on a new task the current model (the champion)
answers old-task prompts x_s greedily; prompt + answer become replay examples (labels -100 on the
prompt) and are mixed into the training batches exactly as ``replay`` does:

    loss = CE(f([x; x_s]), [y; ŷ_s]),   ŷ_s = greedy decode of f_champion(x_s)

SSR also synthesises the prompts by in-context learning with the base model; here they are given
with ``add_prompts`` (strings, or token ids e.g. from a chat template), or, with
``prompts_from_data``, kept from each task's data: prompt tokens only, never the answers. Nothing
else of the task data is stored. At most ``buffer_size`` pending prompts (a uniform sample) are
answered, left-padded, ``generation_batch_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cf_strategies.base import Batch
from cf_strategies.buffer import IGNORE_INDEX, unbatch
from cf_strategies.registry import register
from cf_strategies.replay import Replay


@register
class SelfRehearsal(Replay):
    """Replay of the champion's greedy answers to old-task prompts."""

    name = "self_rehearsal"

    def __init__(
        self,
        buffer_size: int = 500,
        ratio: float = 1.0,
        max_new_tokens: int = 64,
        generation_batch_size: int = 8,
        prompts_from_data: bool = False,
        per_task_quota: bool = False,
        pad_token_id: int = 0,
        eos_token_id: int | None = None,
        seed: int = 0,
    ):
        super().__init__(buffer_size, ratio, per_task_quota, pad_token_id, seed)
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size = generation_batch_size
        self.prompts_from_data = prompts_from_data
        self.eos_token_id = eos_token_id
        self.pending: list[tuple[list[int], int]] = []  # (prompt token ids, task) to answer

    def add_prompts(
        self, prompts: Sequence[str | Sequence[int]], tokenizer: Any = None, task: int | None = None
    ) -> None:
        """Queue old-task prompts; ``task`` defaults to the last finished task (-1 before any)."""
        task = self.task - 1 if task is None else task
        if tokenizer is not None and self.eos_token_id is None:
            self.eos_token_id = tokenizer.eos_token_id
        for p in prompts:
            ids = tokenizer(p)["input_ids"] if isinstance(p, str) else p
            self.pending.append(([int(i) for i in ids], task))

    def before_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        self.rehearse(model)

    @torch.no_grad()
    def rehearse(self, model: nn.Module) -> int:
        """Answer the pending prompts with ``model``; returns how many examples were offered."""
        pending = self.pending
        if len(pending) > self.buffer.capacity:
            pending = self.buffer.rng.sample(pending, self.buffer.capacity)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        eos = {} if self.eos_token_id is None else {"eos_token_id": self.eos_token_id}
        default_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop = _ids(default_eos if self.eos_token_id is None else self.eos_token_id)
        offered = 0
        for start in range(0, len(pending), self.generation_batch_size):
            chunk = pending[start : start + self.generation_batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_token_id)
            attention_mask = torch.zeros_like(input_ids)
            for i, (ids, _) in enumerate(chunk):  # left padding for generation
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                attention_mask[i, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_token_id,
                **eos,
            )
            for (ids, task), answer in zip(chunk, out[:, width:].cpu().tolist(), strict=True):
                answer = _until(answer, stop)
                if answer:
                    self.buffer.add(_example(ids, answer), task)
                    offered += 1
        model.train(was_training)
        self.pending = []
        return offered

    def after_task(self, model: nn.Module, data: Iterable[Batch] | None = None) -> None:
        if self.prompts_from_data:
            for batch in data or ():
                for ex in unbatch(batch):
                    supervised = (ex["labels"] != IGNORE_INDEX).nonzero().flatten()
                    if len(supervised):
                        self.pending.append((ex["input_ids"][: supervised[0]].tolist(), self.task))
        self.buffer.versions[self.task] = self.data_version
        self.task += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending": [[ids, t] for ids, t in self.pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.pending = [(list(ids), int(t)) for ids, t in state["pending"]]


def _ids(token: int | list[int] | None) -> set[int]:
    return set() if token is None else {token} if isinstance(token, int) else set(token)


def _until(answer: list[int], stop: set[int]) -> list[int]:
    """The answer up to and including the first end-of-sequence token."""
    ends = [i for i, t in enumerate(answer) if t in stop]
    return answer[: ends[0] + 1] if ends else answer


def _example(prompt: list[int], answer: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(prompt + answer)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + answer),
    }
