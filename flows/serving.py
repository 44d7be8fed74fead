"""The registered model as an MLflow pyfunc (logged as code, no pickle).

``mlflow.pyfunc.load_model("models:/forgetless-lm@champion").predict(["What is ...?"])``
returns the model's greedy answers. The weights are the ``model_dir`` artifact: a plain
transformers folder (merged LoRA weights, tokenizer, strategy state).

This file is the model's whole code: it imports only torch, transformers, pandas and mlflow,
never ``flows``, so the model loads and serves outside this repository. ``format_prompt`` and
``generate`` give the same answers as ``flows.scoring.generate`` (a test compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from transformers import AutoModelForCausalLM, AutoTokenizer

INPUT_COLUMN = "prompt"
INPUT_EXAMPLE = pd.DataFrame({INPUT_COLUMN: ["What is the capital of France?"]})


def signature(max_new_tokens: int) -> ModelSignature:
    """Strings in (one column, unnamed so that a plain list or string passes the schema; a
    table's column is ``prompt``), one string answer out; ``max_new_tokens`` a param."""
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]),
    )


def load(model_dir: str | Path, for_training: bool = False):
    """Model and tokenizer from a transformers folder: bf16 on a GPU that supports it (fp32 when
    ``for_training``: the optimizer keeps its own precision), else fp32; eval mode to answer."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported() and not for_training
    model = AutoModelForCausalLM.from_pretrained(  # safetensors only: never unpickle weights
        str(model_dir),
        dtype=torch.bfloat16 if bf16 else torch.float32,
        use_safetensors=True,
        trust_remote_code=False,
    )
    model.to(torch.device("cuda" if on_gpu else "cpu"))
    if not for_training:
        model.eval()
    return model, tokenizer


def format_prompt(tokenizer, messages: list[dict[str, str]], use_chat_template: bool) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one
    (and it is enabled), else ``Question:``/``Answer:`` lines."""
    if use_chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "\n".join(m["content"] for m in messages)
    return f"Question: {text}\nAnswer:"


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to formatted prompts, batched with left padding, without the prompt,
    stopped at EOS."""
    eos = model.generation_config.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        enc = tokenizer(
            batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(model.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id if eos is None else eos,
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if progress:
            progress(len(batch))
    return outputs


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    use_chat_template: bool,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to user prompts (each one user turn)."""
    texts = [
        format_prompt(tokenizer, [{"role": "user", "content": p}], use_chat_template)
        for p in prompts
    ]
    return generate_texts(model, tokenizer, texts, max_new_tokens, batch_size)


def as_prompts(model_input: Any) -> list[str]:
    """A list of prompts from a string, a list of strings, or a one-column table (``prompt``;
    what the pyfunc wrapper and the serving REST API pass)."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = INPUT_COLUMN if INPUT_COLUMN in model_input.columns else model_input.columns[0]
        model_input = model_input[column]
    prompts = [model_input] if isinstance(model_input, str) else list(model_input)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


class ForgetlessLM(PythonModel):
    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.model, self.tokenizer = load(context.artifacts["model_dir"])
        self.use_chat_template = bool(config.get("use_chat_template", True))
        self.max_new_tokens = int(config.get("max_new_tokens", 32))
        self.batch_size = int(config.get("batch_size", 8))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        """Greedy answers, one per prompt; ``params={"max_new_tokens": n}`` lengthens them."""
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        return generate(
            self.model,
            self.tokenizer,
            as_prompts(model_input),
            self.use_chat_template,
            max_new_tokens,
            self.batch_size,
        )


mlflow.models.set_model(ForgetlessLM())
