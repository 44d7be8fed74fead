"""Tiny models and batches for the strategy tests (built here, nothing downloaded).

One token convention for every tiny LM here: pad 0, bos 1, eos 2; random tokens are drawn from
3..VOCAB-1, so they are never special."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2


def tiny_mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, classes: int = 4) -> nn.Sequential:
    """A 2-layer MLP classifier: ``model(x) -> logits``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def mlp_batches(
    n_batches: int = 3, batch: int = 8, d_in: int = 8, classes: int = 4, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random ``(x, y)`` batches for :func:`tiny_mlp`."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, d_in, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n_batches)
    ]


def mlp_loss(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``task_loss`` for :func:`cf_strategies.train_task` with the MLP."""
    logits = model(batch[0])
    return nn.functional.cross_entropy(logits, batch[1]), logits


def tiny_llm(
    seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = VOCAB, **config
) -> LlamaForCausalLM:
    """A LlamaForCausalLM (by default 2 layers, hidden 32, vocab 64, pad 0 / bos 1 / eos 2) with
    random weights, from a config; ``config`` overrides LlamaConfig fields. The one tiny-LM
    factory of the tests (``tests/tiny_llm.py`` saves one with a trained tokenizer)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config}))


def tiny_lora(seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    """:func:`tiny_llm` with peft LoRA adapters (non-zero B, so the adapters already matter)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llm(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, config)


def token_batches(
    n_batches: int = 2, batch: int = 4, length: int = 12, seed: int = 0, pad_last: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random token batches (labels = input_ids); the last ``pad_last`` positions of the first
    row are right padding (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[0, -pad_last:] = 0
            ids[0, -pad_last:] = 0
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


def lm_loss(model: nn.Module, batch: dict):
    """``task_loss`` for :func:`cf_strategies.train_task` with a transformers causal LM."""
    out = model(**batch)
    return out.loss, out


def token_batch(
    n: int = 4,
    prompt: tuple[int, int] = (3, 6),
    answer: tuple[int, int] = (2, 5),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``n`` random prompt+answer sequences of random lengths (bounds inclusive), right-padded
    with ``PAD``; labels are -100 on the prompt and on padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        a = int(torch.randint(answer[0], answer[1] + 1, (1,), generator=g))
        rows.append((torch.randint(3, VOCAB, (p + a,), generator=g), p))
    width = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((n, width), PAD),
        "attention_mask": torch.zeros(n, width, dtype=torch.long),
        "labels": torch.full((n, width), -100),
    }
    for i, (ids, p) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = ids
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, p : len(ids)] = ids[p:]
    return batch


class TinyClassifier(nn.Module):
    """An MLP whose ``forward(x, task=None)`` gives all logits, or with ``task`` only the two
    logits of that task's head (one head of two classes per task)."""

    def __init__(self, inputs: int = 8, classes: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(inputs, 16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.body(x))
        if task is None:
            return logits
        columns = torch.stack([2 * task, 2 * task + 1], dim=1)
        return logits.gather(1, columns)


def class_batches(
    count: int = 3, n: int = 8, classes=(0, 1), task: int | None = None, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Random ``{"x", "labels"}`` batches for :class:`TinyClassifier` (labels drawn from
    ``classes``, inputs shifted by the label), with ``task`` ids when given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
        batch = {"x": torch.randn(n, 8, generator=g) + labels[:, None].float(), "labels": labels}
        if task is not None:
            batch["task"] = torch.full((n,), task)
        out.append(batch)
    return out


def ce_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``task_loss`` for :func:`cf_strategies.train_task` with a classifier batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs)
    return nn.functional.cross_entropy(logits, batch["labels"]), logits
