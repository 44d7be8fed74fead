"""Loading a causal LM and turning examples into prompts and training tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flows.data import Example


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_dir: str | Path, for_training: bool = False):
    """Model and tokenizer from a folder; bf16 on a GPU that supports it, fp32 on the CPU."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not for_training:
        dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.to(device())
    if not for_training:
        model.eval()
    return model, tokenizer


def format_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], use_chat_template: bool
) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has
    one (and it is enabled), else ``Question:``/``Answer:`` lines."""
    if use_chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "\n".join(m["content"] for m in messages)
    return f"Question: {text}\nAnswer:"


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
