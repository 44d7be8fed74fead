"""Tiny models and batches for the regularisation-family tests (built here, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


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


def tiny_llm(seed: int = 0, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    """A 2-layer LlamaForCausalLM (hidden 32, vocab 64) with random weights, from a config."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


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
