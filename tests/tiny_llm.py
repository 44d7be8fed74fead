"""A tiny causal LM for tests: a 2-layer Llama and a byte-level BPE tokenizer trained here, on
the demo text, in about a second. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.cf_strategies.tiny_models import tiny_llm


def build_tiny_llm(out: Path, corpus: list[str], vocab_size: int = 384, seed: int = 0) -> Path:

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    tiny_llm(
        seed,
        hidden=64,
        vocab=len(fast),
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.25,  # large enough that a frozen tied head can express a confident answer
    ).save_pretrained(out)
    fast.save_pretrained(out)
    return out
