"""Scoring a model on examples: greedy-generation match and log-likelihood multiple choice.

- ``generate``: greedy decoding; with ``choices`` the first choice named in the output must be an
  accepted answer, otherwise an accepted answer must appear in the output (case-insensitive).
- ``rouge_l``: greedy decoding; the output is right when its ROUGE-L F-measure (Lin, 2004: the
  longest common subsequence of words, over lower-cased Unicode words) against an accepted answer
  reaches ``ROUGE_L_RIGHT``. This is how a release's items without choices are judged: TRACE
  (Wang et al., 2023) scores generation tasks by ROUGE-L. At 0.5 a short answer must be about all
  the output ("1968 film by Stanley Kubrick" for "A 1968 science fiction film by Stanley
  Kubrick": 0.77; "1588" for "The first year it gives is 1588": 0.29), and a free-text one must
  share half its words, in order, with the reference.
- ``choice``: the choice with the highest mean token log-likelihood after the prompt must be an
  accepted answer. The LM head runs only on the choice tokens, not on every position.
- ``loglik``: lm-evaluation-harness's multiple choice (``acc``): the raw prompt text, no chat
  template, is the context; each choice, after the item's ``delimiter`` (" "), is scored by the
  *sum* of its tokens' log-probabilities, tokenized as lm-eval does (the whole text encoded,
  the context's tokens cut off; trailing spaces of the context moved to the continuation; no
  BOS); the highest must be an accepted answer. On the same model and items this is lm-eval's
  own accuracy (``tests/flows/test_lm_eval_source.py``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from rouge_score.rouge_scorer import RougeScorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flows.core.data import CHOICE_KINDS, GENERATION_KINDS, Example
from flows.registry.serving import format_prompt, generate_texts

Progress = Callable[[int], None]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def first_choice_named(output: str, choices: Sequence[str]) -> str | None:
    """The choice whose name appears earliest in the output (longest wins a tie)."""
    out = f" {_norm(output)} "
    found = [(out.find(f" {_norm(c)} "), -len(c), c) for c in choices]
    found = [f for f in found if f[0] >= 0]
    return min(found)[2] if found else None


ROUGE_L_RIGHT = 0.5  # the F-measure a ``rouge_l`` answer needs to count as right


class _Words:
    """rouge-score's tokenizer keeps only ASCII letters; this one keeps every language's words."""

    def tokenize(self, text: str) -> list[str]:
        return _norm(text).split()


_ROUGE = RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure of ``output`` against ``reference`` (Lin, 2004), in [0, 1]."""
    return _ROUGE.score(reference, output)["rougeL"].fmeasure


def generation_correct(output: str, ex: Example) -> bool:
    if ex.scoring == "rouge_l":
        return max(rouge_l(output, a) for a in ex.answers) >= ROUGE_L_RIGHT
    if ex.choices:
        named = first_choice_named(output, ex.choices)
        return named is not None and _norm(named) in {_norm(a) for a in ex.answers}
    out = f" {_norm(output)} "
    return any(f" {_norm(a)} " in out for a in ex.answers)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    use_chat_template: bool,
    max_new_tokens: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding (the registered model's own generation)."""
    texts = [format_prompt(tokenizer, ex.messages, use_chat_template) for ex in examples]
    return generate_texts(model, tokenizer, texts, max_new_tokens, batch_size, progress)


def body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The transformer body and the LM head of a plain transformers model, so that the head runs
    on the answer positions only; None for a model that must run whole: a peft wrapper, or one
    whose forward is hooked (progressive's columns drive their passes from the root's hooks)."""
    if hasattr(model, "get_base_model") or model._forward_hooks or model._forward_pre_hooks:
        return None
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def choice_pairs(
    tokenizer: PreTrainedTokenizerBase, ex: Example, use_chat_template: bool
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per choice of a ``choice`` item: the formatted prompt,
    then the choice."""
    prompt = tokenizer(
        format_prompt(tokenizer, ex.messages, use_chat_template), add_special_tokens=False
    )["input_ids"]
    sep = "" if use_chat_template and tokenizer.chat_template else " "
    return [(prompt, tokenizer(sep + c, add_special_tokens=False)["input_ids"]) for c in ex.choices]


def lm_eval_pairs(tokenizer: PreTrainedTokenizerBase, ex: Example) -> list[tuple[list, list]]:
    """(context ids, continuation ids) per choice of a ``loglik`` item, as lm-eval's
    ``_encode_pair`` makes them for a causal model."""
    out = []
    for choice in ex.choices:
        context, continuation = ex.prompt_text, ex.delimiter + choice
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        head = tokenizer(context, add_special_tokens=False)["input_ids"]
        out.append((whole[: len(head)], whole[len(head) :]))
    return out


def padded(
    seqs: Sequence[list[int]], pad: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as one tensor padded to the longest (on the right, or on the left), and the
    attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        at = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, at] = torch.tensor(s, dtype=torch.long)
        mask[row, at] = 1
    return ids, mask


@torch.no_grad()
def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
) -> list[torch.Tensor]:
    """Per (context, continuation) pair, the log-probability of each continuation token after
    what precedes it, the LM head only at the continuation's positions. Consecutive pairs with
    one context (the choices of an item) run it once: its keys and values are cached and each
    continuation reads them, the same numbers as running every pair whole up to float rounding
    (``tests/flows/test_scoring.py``), at a third of the tokens for four short choices."""
    split = body_and_head(model)
    if split is None:  # a peft wrapper or a hooked model runs whole, pair by pair
        return _whole_pairs(model, tokenizer, pairs, batch_size)
    body, head = split
    groups: list[tuple[list[int], list[int]]] = []  # (context, the pairs that continue it)
    for i, (context, _) in enumerate(pairs):
        if groups and groups[-1][0] == context:
            groups[-1][1].append(i)
        else:
            groups.append((context, [i]))
    # alike lengths together: less padding in each batch (the results go back by index)
    groups.sort(key=lambda g: (max(len(pairs[i][1]) for i in g[1]), len(g[0])))
    out: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    device, pad = model.device, tokenizer.pad_token_id
    start = 0
    while start < len(groups):
        rows, stop = 0, start
        while stop < len(groups) and (rows == 0 or rows + len(groups[stop][1]) <= batch_size):
            rows, stop = rows + len(groups[stop][1]), stop + 1
        chunk, start = groups[start:stop], stop
        contexts = [c for c, _ in chunk]
        ids, mask = padded(contexts, pad, left=True)  # each context ends in the last column
        first = body(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
            use_cache=True,
        )
        last, cache = first[0][:, -1], first.cache
        owner = torch.tensor([g for g, (_, idx) in enumerate(chunk) for _ in idx])
        members = [i for _, idx in chunk for i in idx]
        conts = [pairs[i][1] for i in members]
        cache.batch_select_indices(owner.to(device))
        cids, cmask = padded(conts, pad)
        cwidth = cids.shape[1]
        lengths = torch.tensor([len(contexts[g]) for g in owner.tolist()])
        second = body(
            input_ids=cids.to(device),
            attention_mask=torch.cat([mask[owner], cmask], dim=1).to(device),
            position_ids=(lengths[:, None] + torch.arange(cwidth)[None]).to(device),
            cache=cache,
        )
        # the head once for the batch: at each continuation token, the hidden state before it
        at = torch.cat(
            [
                torch.cat([last[owner[row]][None], second[0][row, : len(c) - 1]])
                for row, c in enumerate(conts)
            ]
        )
        target = torch.tensor([t for c in conts for t in c], device=at.device)
        logp = torch.log_softmax(head(at).float(), dim=-1).gather(1, target[:, None])[:, 0]
        for i, part in zip(members, logp.split([len(c) for c in conts]), strict=True):
            out[i] = part
    return out


def _whole_pairs(model, tokenizer, pairs, batch_size) -> list[torch.Tensor]:
    """``continuation_logprobs`` for a model that must run whole: each pair as one sequence."""
    out: list[torch.Tensor] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask = padded([p + c for p, c in chunk], pad)
        logits_all = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
        for row, (p, c) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=model.device)
            logits = logits_all.logits[row, positions].float()
            target = torch.tensor(c, device=logits.device)
            out.append(torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0])
    return out


def choice_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    use_chat_template: bool,
    batch_size: int,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Per example, a score per choice: the mean token log-probability (``choice``) or the sum
    (``loglik``, lm-eval's ``acc``). Examples go in blocks, whole (an item's choices share its
    context in one pass), and progress is reported after each block."""
    scores: list[list[float]] = []
    block = batch_size * 2  # examples between progress reports
    for start in range(0, len(examples), block):
        part = examples[start : start + block]
        pairs, owner = [], []
        for i, ex in enumerate(part):
            made = (
                lm_eval_pairs(tokenizer, ex)
                if ex.scoring == "loglik"
                else choice_pairs(tokenizer, ex, use_chat_template)
            )
            pairs += made
            owner += [i] * len(made)
        mine: list[list[float]] = [[] for _ in part]
        for i, lp in zip(
            owner, continuation_logprobs(model, tokenizer, pairs, batch_size), strict=True
        ):
            mine[i].append(float(lp.sum() if part[i].scoring == "loglik" else lp.mean()))
        scores += mine
        if progress:
            progress(len(part))
    return scores


def score_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    use_chat_template: bool,
    max_new_tokens: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[dict]:
    """Per-example results: ``{"id", "task", "category", "scoring", "output", "correct"}``."""
    results: dict[int, dict] = {}
    gen_idx = [i for i, ex in enumerate(examples) if ex.scoring in GENERATION_KINDS]
    mc_idx = [i for i, ex in enumerate(examples) if ex.scoring in CHOICE_KINDS]
    if gen_idx:
        outs = generate(
            model,
            tokenizer,
            [examples[i] for i in gen_idx],
            use_chat_template,
            max_new_tokens,
            batch_size,
            progress,
        )
        for i, out in zip(gen_idx, outs, strict=True):
            results[i] = result_of(examples[i], out)
    if mc_idx:
        lls = choice_scores(
            model, tokenizer, [examples[i] for i in mc_idx], use_chat_template, batch_size, progress
        )
        for i, ll in zip(mc_idx, lls, strict=True):
            ex = examples[i]
            results[i] = result_of(ex, ex.choices[max(range(len(ll)), key=ll.__getitem__)])
    return [results[i] for i in range(len(examples))]


def is_correct(ex: Example, output: str) -> bool:
    """Whether a model's output (generated text, or the choice it ranked first) is right."""
    if ex.scoring in CHOICE_KINDS:
        return _norm(output) in {_norm(a) for a in ex.answers}
    return generation_correct(output, ex)


def result_of(ex: Example, output: str) -> dict:
    """One per-item result: ``{"id", "task", "category", "scoring", "output", "correct"}``."""
    return {
        "id": ex.id,
        "task": ex.task,
        "category": ex.category,
        "scoring": ex.scoring,
        "output": output,
        "correct": is_correct(ex, output),
    }


def accuracy_by_task(results: Sequence[dict]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        hits[r["task"]].append(bool(r["correct"]))
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}
