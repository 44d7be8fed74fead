"""A tiny causal LM and token batches for the replay/distillation tests (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
PAD = 0
EOS = 1


def tiny_lm(seed: int = 0, vocab: int = VOCAB, hidden: int = 32, layers: int = 2):
    """A 2-layer LlamaForCausalLM with random weights, built from a config."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def token_batch(
    n: int = 4,
    prompt: tuple[int, int] = (3, 6),
    answer: tuple[int, int] = (2, 5),
    seed: int = 0,
    vocab: int = VOCAB,
) -> dict[str, torch.Tensor]:
    """``n`` random prompt+answer sequences of random lengths, right-padded with ``PAD``;
    labels are -100 on the prompt and on padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        a = int(torch.randint(answer[0], answer[1] + 1, (1,), generator=g))
        rows.append((torch.randint(3, vocab, (p + a,), generator=g), p))
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


def token_batches(count: int = 3, n: int = 4, seed: int = 0, **kwargs) -> list[dict]:
    return [token_batch(n, seed=seed * 1000 + i, **kwargs) for i in range(count)]


def lm_loss(model, batch):
    """The task loss of ``train_task`` for a causal LM."""
    outputs = model(**batch)
    return outputs.loss, outputs


class TinyClassifier(torch.nn.Module):
    """An MLP whose ``forward(x, task=None)`` gives all logits, or with ``task`` only the two
    logits of that task's head (one head of two classes per task)."""

    def __init__(self, inputs: int = 8, classes: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(inputs, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, classes)

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(self.body(x))
        if task is None:
            return logits
        columns = torch.stack([2 * task, 2 * task + 1], dim=1)
        return logits.gather(1, columns)


def class_batches(count: int = 3, n: int = 8, classes=(0, 1), task=None, seed: int = 0):
    """Random ``{"x", "labels"}`` batches (labels drawn from ``classes``), with ``task`` ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
        batch = {"x": torch.randn(n, 8, generator=g) + labels[:, None].float(), "labels": labels}
        if task is not None:
            batch["task"] = torch.full((n,), task)
        out.append(batch)
    return out


def ce_loss(model, batch):
    """The task loss of ``train_task`` for a classifier batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs)
    return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits
