"""Step 4, fine-tune: LoRA on the champion with the strategies named in ``params.yaml``.

Runs a ``cf_strategies.ContinualTrainer`` (a transformers ``Trainer``) on the release's
``train.jsonl``, loads the strategies' state saved beside the champion (Fisher, importances,
buffers), merges the adapter, and writes the candidate folder atomically: weights, tokenizer and
``strategy_state/`` for the next release. On a GPU it trains in bf16; on the CPU in fp32.

With a parameter-isolation strategy (packnet, progressive) nothing is merged: the folder keeps
the base weights, the strategies' state holds every release's parameters, and ``tasks.json``
says how to rebuild them (``flows/serving.py``: ``TaskRouter``). The next release then needs the
same isolation strategy; a champion of another kind is refused before training.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

import cf_strategies
from flows.config import Params
from flows.data import load_release, read_jsonl
from flows.demo_data import build_demo
from flows.modeling import format_prompt, load_model, tokenize_for_training
from flows.records import ChampionRef, TrainResult
from flows.serving import STRATEGY_STATE, TASKS_FILE, tasks_spec


def rehearsal_prompt_file(params: Params) -> Path:
    if params.train.rehearsal_prompts:
        return params.path(params.train.rehearsal_prompts)
    return build_demo(params.path(params.data.demo_dir)) / "rehearsal" / "general_prompts.jsonl"


def rehearsal_prompts(params: Params, tokenizer) -> list[list[int]]:
    """The rehearsal prompts as token ids, formatted as the model sees a user turn."""
    chat = params.model.use_chat_template
    return [
        tokenizer(
            format_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}], chat),
            add_special_tokens=False,
        )["input_ids"]
        for _, r in read_jsonl(rehearsal_prompt_file(params))
    ]


def task_context(params: Params, tokenizer, release_dir: Path) -> cf_strategies.TaskContext:
    """What the pipeline tells strategies about this task: the release's name, the tokenizer's
    pad/eos ids, the rehearsal prompts (formatted as the model sees them) and how many of them
    EWC, SI and HLR use to measure general knowledge before the first release."""
    uses_prompts = any(
        cf_strategies.STRATEGIES[n].uses_rehearsal_prompts
        for n in cf_strategies.split_spec(params.train.strategy)
    )
    return cf_strategies.TaskContext(
        release=release_dir.name,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rehearsal_prompts=rehearsal_prompts(params, tokenizer) if uses_prompts else [],
        general_importance_prompts=params.train.general_importance_prompts,
        max_steps=params.train.max_steps,
    )


def check_single_process() -> None:
    """Refuse a distributed launch: every rank would train, save and register its own
    candidate, and EWC's Fisher would not be reduced across ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"the fine-tune step runs in one process, not {world}: multi-process training "
            "(accelerate launch, torchrun) is not supported yet; run it without a launcher"
        )


def isolating_spec(spec: str) -> str:
    """The parameter-isolation strategies of a spec, joined ("" when there are none)."""
    names = cf_strategies.split_spec(spec)
    return "+".join(n for n in names if cf_strategies.STRATEGIES[n].isolates_tasks)


def check_champion_kind(champion_dir: Path, spec: str) -> None:
    """A champion that keeps parameters per task can only be continued by the same isolation
    strategy: any other would load its base weights alone and lose every task it learned."""
    kept = tasks_spec(champion_dir)
    if kept is not None and isolating_spec(spec) != kept["strategy"]:
        raise ValueError(
            f"the champion ({champion_dir}) keeps parameters per task with "
            f"{kept['strategy']!r} (tasks {kept['tasks']}); train.strategy {spec!r} would "
            f"start again from its base weights and drop those tasks. Keep "
            f"{kept['strategy']!r} in train.strategy, or roll back to a merged champion"
        )


def write_tasks_file(folder: Path, params: Params, strategies: list) -> None:
    """``tasks.json``: which strategies hold the tasks, with their options, the tasks learned
    and, when their state is per adapter parameter, the LoRA adapter's shape."""
    isolating = [s for s in strategies if s.isolates_tasks]
    lora = params.train.lora
    spec = {
        "strategy": "+".join(s.name for s in isolating),
        "strategy_params": {
            s.name: params.train.strategy_params.get(s.name, {}) for s in isolating
        },
        "tasks": list(isolating[0].tasks),
        "lora": (
            {
                "r": lora.r,
                "lora_alpha": lora.alpha,
                "lora_dropout": lora.dropout,
                "target_modules": list(lora.target_modules),
            }
            if any(s.state_on_adapter for s in isolating)
            else None
        ),
    }
    (folder / TASKS_FILE).write_text(json.dumps(spec, indent=1))


def finetune(
    params: Params, champion: ChampionRef, release_dir: Path, run_dir: Path
) -> TrainResult:
    check_single_process()
    cfg = params.train
    check_champion_kind(champion.model_dir, cfg.strategy)
    set_seed(cfg.seed)
    model, tokenizer = load_model(
        champion.model_dir, for_training=True, trust_remote_code=params.model.trust_remote_code
    )
    chat = params.model.use_chat_template
    train_set = [
        tokenize_for_training(tokenizer, ex, chat, cfg.max_length)
        for ex in load_release(release_dir, "train")
    ]
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    strategies = cf_strategies.build_strategies(cfg.strategy, cfg.strategy_params)
    state_dir = Path(champion.model_dir) / STRATEGY_STATE
    if state_dir.is_dir():
        cf_strategies.load_strategies(strategies, state_dir)
    for s in strategies:  # the champion's adapter was merged: the fresh one starts where it ended
        s.reanchor(model)
    context = task_context(params, tokenizer, release_dir)
    for s in strategies:
        s.prepare(context)

    gpu = torch.cuda.is_available()
    model.to("cuda" if gpu else "cpu")
    args = TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not gpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = cf_strategies.ContinualTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        strategies=strategies,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    out = run_dir / "candidate_model"
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cf_strategies.save_strategies(strategies, tmp / STRATEGY_STATE)
    if isolating_spec(cfg.strategy):  # keep the base; the state rebuilds every task
        for s in strategies:
            s.use_task(trainer.model, cf_strategies.BASE)  # progressive: columns off
        trainer.model.unload().save_pretrained(tmp)
        write_tasks_file(tmp, params, strategies)
    else:
        trainer.model.merge_and_unload().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return TrainResult(
        model_dir=out,
        strategy=cfg.strategy,
        steps=trainer.state.global_step,
        train_seconds=seconds,
        log_history=[h for h in trainer.state.log_history if "loss" in h],
    )
