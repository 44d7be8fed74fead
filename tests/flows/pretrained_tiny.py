"""A tiny Llama that already KNOWS an old task, for tests where retention must mean something.

The old task is world capitals ("What is the capital of France?" -> "Paris"). The tiny model
(``tests.tiny_llm.build_tiny_llm``) is trained on every fact in full (all weights, plain torch
loop, seconds on a CPU), in the exact prompt format the pipeline uses without a chat template.
The facts are split in two: the probe source (what retention is measured on) and the rehearsal
prompts (other old-task questions a rehearsal strategy may have the champion answer; never a
probe). The new release, order status, answers every question with one word: naive fine-tuning
with a high learning rate makes the model answer that word to every question, capitals included.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.core.data import probe_example, write_jsonl
from flows.steps.modeling import tokenize_for_training
from tests.tiny_llm import build_tiny_llm

OLD_TASK = "capitals"
NEW_TASK = "order-status"
NEW_ANSWER = "Shipped"

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo",
    "Peru": "Lima", "Cuba": "Havana", "Kenya": "Nairobi", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Hungary": "Budapest",
    "Chile": "Santiago", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "Mali": "Bamako", "Ghana": "Accra", "Qatar": "Doha", "Oman": "Muscat",
    "Nepal": "Kathmandu", "Latvia": "Riga", "Estonia": "Tallinn", "Belgium": "Brussels",
    "Denmark": "Copenhagen", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Senegal": "Dakar",
    "Uganda": "Kampala", "Sudan": "Khartoum", "Libya": "Tripoli", "Morocco": "Rabat",
    "Jordan": "Amman", "Lebanon": "Beirut", "Armenia": "Yerevan", "Georgia": "Tbilisi",
    "Cyprus": "Nicosia", "Malta": "Valletta", "Serbia": "Belgrade", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Ukraine": "Kyiv", "Canada": "Ottawa", "Colombia": "Bogota",
    "Ecuador": "Quito", "Uruguay": "Montevideo", "Venezuela": "Caracas", "Jamaica": "Kingston",
    "Nigeria": "Abuja", "Rwanda": "Kigali", "Angola": "Luanda", "Zambia": "Lusaka",
    "Australia": "Canberra", "Bangladesh": "Dhaka", "Indonesia": "Jakarta", "Turkey": "Ankara",
}  # fmt: skip


def capital_question(country: str) -> str:
    return f"What is the capital of {country}?"


def old_task_items() -> list[dict]:
    """Every old-task fact as a probe item (``generate`` scoring)."""
    return [
        {
            "id": f"capital-{country.lower()}",
            "prompt": capital_question(country),
            "answers": [city],
            "task": OLD_TASK,
            "category": "capitals",
            "scoring": "generate",
        }
        for country, city in CAPITALS.items()
    ]


def split_old_task(n_probes: int = 32, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(probe items, rehearsal items): disjoint, together every fact."""
    items = old_task_items()
    random.Random(seed).shuffle(items)
    return items[:n_probes], items[n_probes:]


def write_old_task(folder: Path, n_probes: int = 32) -> tuple[Path, Path]:
    """The probe source and the rehearsal prompts (``{"id", "prompt"}``) as JSONL files."""
    probes, rehearsal = split_old_task(n_probes)
    probe_file = write_jsonl(folder / "capitals_probes.jsonl", probes)
    prompts = [{"id": r["id"], "prompt": r["prompt"]} for r in rehearsal]
    return probe_file, write_jsonl(folder / "capitals_rehearsal.jsonl", prompts)


def write_new_release(folder: Path, n_train: int = 64, n_eval: int = 16, seed: int = 1) -> Path:
    """A release ``order-status``: "What is the status of order 4821?" -> "Shipped"."""
    numbers = random.Random(seed).sample(range(1000, 10000), n_train + n_eval)
    records = [
        {
            "id": f"order-{n}",
            "prompt": f"What is the status of order {n}?",
            "completion": NEW_ANSWER,
        }
        for n in numbers
    ]
    release = folder / NEW_TASK
    write_jsonl(release / "train.jsonl", records[:n_train])
    write_jsonl(release / "eval.jsonl", records[n_train:])
    return release


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: both tasks, in the pipeline's prompt format."""
    corpus = [f"Question: {capital_question(c)}\nAnswer: {city}" for c, city in CAPITALS.items()]
    corpus += [f"Question: What is the status of order {n}?\nAnswer: Shipped" for n in range(100)]
    return corpus


def pretrain_tiny_llm(
    out: Path, steps: int = 300, learning_rate: float = 3e-3, seed: int = 0
) -> Path:
    """A tiny Llama trained on every capital fact until it answers them; saved in ``out``."""
    build_tiny_llm(out, tokenizer_corpus(), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    examples = [probe_example(r) for r in old_task_items()]
    rows = [tokenize_for_training(tokenizer, ex, False, 64) for ex in examples]
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    batch = {
        "input_ids": pad("input_ids", tokenizer.pad_token_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", -100),
    }
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return out
