"""Turning examples into prompts and training tokens; loading a model (``load_model``) and
formatting a prompt are the registered model's own code, ``flows/registry/serving.py``, reused here."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from flows.core.data import Example
from flows.registry.serving import format_prompt
from flows.registry.serving import load as load_model

__all__ = ["device", "format_prompt", "load_model", "tokenize_for_training"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tokenize_for_training(
    tokenizer: PreTrainedTokenizerBase, ex: Example, use_chat_template: bool, max_length: int
) -> dict[str, list[int]]:
    """input_ids of prompt + completion + EOS; labels are -100 on the prompt (loss on the
    answer only). Long prompts are cut from the left so the answer always fits."""
    prompt = tokenizer(
        format_prompt(tokenizer, ex.messages, use_chat_template), add_special_tokens=False
    )
    sep = "" if use_chat_template and tokenizer.chat_template else " "
    answer = tokenizer(sep + ex.completion, add_special_tokens=False)["input_ids"]
    answer = answer + [tokenizer.eos_token_id]
    prompt_ids = prompt["input_ids"][-max(1, max_length - len(answer)) :]
    input_ids = (prompt_ids + answer)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
