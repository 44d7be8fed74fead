"""Step 4, fine-tune: LoRA on the champion with the strategies named in ``params.yaml``.

Runs a ``cf_strategies.ContinualTrainer`` (a transformers ``Trainer``) on the release's
``train.jsonl``, loads the strategies' state saved beside the champion (Fisher, importances,
buffers), merges the adapter, and writes the candidate folder atomically: weights, tokenizer and
``strategy_state/`` for the next release. On a GPU it trains in bf16; on the CPU in fp32; the
weights are stored in that dtype (``save_candidate``).

Every ``train.checkpoint_steps`` steps the Trainer checkpoints into ``<run>/trainer/`` (the LoRA
adapter, optimizer, scheduler, RNG states, step counter and the strategies' state, running sums
included: ``cf_strategies.trainer``). A retry of the step on the same run folder (a Prefect
retry, ``forgetless resume``, the DVC stage again) resumes from the latest complete checkpoint of
the same setup (``checkpoint_to_resume``); the checkpoints are deleted once the candidate is
written.

With a parameter-isolation strategy (packnet, progressive) nothing is merged: the folder keeps
the base weights, the strategies' state holds every release's parameters, and ``tasks.json``
says how to rebuild them (``flows/registry/serving.py``: ``TaskRouter``). The next release then needs the
same isolation strategy; a champion of another kind is refused before training.

With ``train.num_processes`` above one the step runs on that many processes (DDP, or FSDP with
``train.fsdp``): ``flows.production.launch.train`` starts them, every rank runs this step
(``flows/steps/ranks.py``), rank 0 writes the candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel, ConfigDict
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)

import cf_strategies
from flows.core.config import ModelConfig, Params, TrainConfig
from flows.core.data import load_release, read_jsonl
from flows.core.records import ChampionRef, TrainResult
from flows.demo.build import build_demo
from flows.registry.serving import (
    ADAPTER_PARENT,
    STRATEGY_STATE,
    TASKS_FILE,
    content_hash,
    tasks_spec,
)
from flows.steps import modeling, ranks
from flows.steps.modeling import format_prompt, load_model, tokenize_for_training

CANDIDATE_DIR = "candidate_model"  # the candidate folder in a run folder
CHECKPOINT_DIR = "trainer"  # the Trainer's checkpoints in a run folder, while it trains
CHECKPOINTS_KEPT = 2  # a save killed half-way leaves the one before it whole

log = logging.getLogger(__name__)


def uses_rehearsal_prompts(spec: str) -> bool:
    """Whether a strategy of ``spec`` reads the rehearsal prompts."""
    return any(
        cf_strategies.STRATEGIES[n].uses_rehearsal_prompts for n in cf_strategies.split_spec(spec)
    )


class FinetuneStep(BaseModel):
    """What the fine-tune step reads: the ``train`` and ``model`` sections, how the candidate's
    weights are stored (``registry.weights``) and, for a strategy that rehearses prompts, their
    file, resolved from ``params.yaml`` once (:meth:`from_params`). It is also what the ranks of
    a multi-process launch receive (``flows.production.launch``)."""

    model_config = ConfigDict(frozen=True)

    train: TrainConfig
    model: ModelConfig
    weights: Literal["merged", "adapter"]  # registry.weights
    rehearsal_prompts: Path | None  # None: the strategy rehearses no prompts

    @classmethod
    def from_params(cls, params: Params) -> FinetuneStep:
        """With a strategy that rehearses prompts: ``train.rehearsal_prompts`` made absolute,
        or (unset) the embedded demo's general prompts."""
        prompts = None
        if uses_rehearsal_prompts(params.train.strategy):
            if params.train.rehearsal_prompts:
                prompts = params.path(params.train.rehearsal_prompts)
            else:
                demo = build_demo(params.path(params.data.demo_dir))
                prompts = demo / "rehearsal" / "general_prompts.jsonl"
        return cls(
            train=params.train,
            model=params.model,
            weights=params.registry.weights,
            rehearsal_prompts=prompts,
        )


def rehearsal_prompts(step: FinetuneStep, tokenizer) -> list[list[int]]:
    """The rehearsal prompts as token ids, formatted as the model sees a user turn."""
    chat = step.model.use_chat_template
    return [
        tokenizer(
            format_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}], chat),
            add_special_tokens=False,
        )["input_ids"]
        for _, r in read_jsonl(step.rehearsal_prompts)
    ]


def task_context(step: FinetuneStep, tokenizer, release_dir: Path) -> cf_strategies.TaskContext:
    """What the pipeline tells strategies about this task: the release's name, the tokenizer's
    pad/eos ids, the rehearsal prompts (formatted as the model sees them) and how many of them
    EWC, SI and HLR use to measure general knowledge before the first release."""
    return cf_strategies.TaskContext(
        release=release_dir.name,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rehearsal_prompts=rehearsal_prompts(step, tokenizer) if step.rehearsal_prompts else [],
        general_importance_prompts=step.train.general_importance_prompts,
        max_steps=step.train.max_steps,
    )


def check_ranks(step: FinetuneStep) -> None:
    """Inside a rank of a multi-process launch (``flows.production.launch``, or accelerate launch /
    torchrun started by hand): refuse what several processes cannot train correctly
    (``ranks.check_ranks``), then put this rank on its own GPU. Rank 0 alone saves."""
    ranks.check_ranks(step.train, ranks.launched_world())
    ranks.enter_rank()


def check_padding_free(cfg: TrainConfig) -> None:
    """``train.padding_free`` flattens each batch into one row (``DataCollatorWithFlattening``);
    refuse it, before any training, with a strategy that needs one row per example
    (``Strategy.flattening_safe``)."""
    if not cfg.padding_free:
        return
    strategies = cf_strategies.build_strategies(cfg.strategy, cfg.strategy_params)
    unsafe = [s.name for s in strategies if not s.flattening_safe]
    if unsafe:
        safe = sorted(n for n, c in cf_strategies.STRATEGIES.items() if c.flattening_safe)
        raise ValueError(
            f"train.padding_free: {', '.join(unsafe)} need one row per example (rows added to "
            "the batch, per-example passes or options such as lwf positions='all') and cannot "
            f"train on a flattened batch; set train.padding_free: false, or use {', '.join(safe)}"
        )


def collator(tokenizer, padding_free: bool = False):
    """The fine-tune step's batches: padded rows, or with ``train.padding_free`` one row of the
    examples end to end, ``position_ids`` restarting at each (transformers then masks attention
    block-diagonally, sdpa or eager) and the label at each boundary -100: the same loss over
    the same label tokens without computing padding. The mask is built only without a KV
    cache: the Trainer sets ``config.use_cache = args.use_cache`` (False)."""
    if padding_free:
        return DataCollatorWithFlattening()
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def lora_config(cfg: TrainConfig) -> LoraConfig:
    """The adapter the step trains on the champion (``train.lora``)."""
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )


def training_arguments(cfg: TrainConfig, output_dir: Path) -> TrainingArguments:
    """The Trainer's arguments of the step: ``train`` in params.yaml, checkpoints into
    ``output_dir``, bf16 on a GPU that has it (fp32 on the CPU). Benchmarks reuse it."""
    gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or None,
        save_total_limit=CHECKPOINTS_KEPT,
        report_to=[],
        seed=cfg.seed,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not gpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
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


def write_tasks_file(folder: Path, step: FinetuneStep, strategies: list) -> None:
    """``tasks.json``: which strategies hold the tasks, with their options, the tasks learned
    and, when their state is per adapter parameter, the LoRA adapter's shape."""
    isolating = [s for s in strategies if s.isolates_tasks]
    lora = step.train.lora
    spec = {
        "strategy": "+".join(s.name for s in isolating),
        "strategy_params": {s.name: step.train.strategy_params.get(s.name, {}) for s in isolating},
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


def build_trainer(
    step: FinetuneStep,
    champion_dir: Path,
    release_dir: Path,
    output_dir: Path,
    tag: str = "",
) -> tuple[cf_strategies.ContinualTrainer, PreTrainedTokenizerBase]:
    """The step's trainer and the champion's tokenizer: the champion in ``champion_dir`` with a
    fresh LoRA adapter (``lora_config``), the strategies of ``train.strategy`` with the state
    saved beside the champion, prepared for the release, its training examples, and
    ``training_arguments`` with checkpoints (tagged ``tag``) in ``output_dir``.
    Seeded with ``train.seed`` (the adapter's initialisation). Under FSDP the model stays on
    the CPU: accelerate shards it onto the GPUs. Benchmarks time the step with it."""
    cfg = step.train
    set_seed(cfg.seed)
    device = "cpu" if ranks.sharded() else str(modeling.device())
    model, tokenizer = load_model(
        champion_dir,
        for_training=True,
        trust_remote_code=step.model.trust_remote_code,
        device=device,
    )
    chat = step.model.use_chat_template
    train_set = [
        tokenize_for_training(tokenizer, ex, chat, cfg.max_length)
        for ex in load_release(release_dir, "train")
    ]
    model = get_peft_model(model, lora_config(cfg))
    strategies = cf_strategies.build_strategies(cfg.strategy, cfg.strategy_params)
    state_dir = Path(champion_dir) / STRATEGY_STATE
    if state_dir.is_dir():
        cf_strategies.load_strategies(strategies, state_dir)
    for s in strategies:  # the champion's adapter was merged: the fresh one starts where it ended
        s.reanchor(model)
    context = task_context(step, tokenizer, release_dir)
    for s in strategies:
        s.prepare(context)
    model.to(device)
    return cf_strategies.ContinualTrainer(
        model=model,
        args=training_arguments(cfg, output_dir),
        train_dataset=train_set,
        data_collator=collator(tokenizer, cfg.padding_free),
        strategies=strategies,
        checkpoint_tag=tag,
    ), tokenizer


def finetune(
    step: FinetuneStep, champion: ChampionRef, release_dir: Path, run_dir: Path
) -> TrainResult:
    check_padding_free(step.train)
    check_ranks(step)
    cfg = step.train
    check_champion_kind(champion.model_dir, cfg.strategy)
    tag = checkpoint_tag(step, champion, release_dir)
    trainer, tokenizer = build_trainer(
        step, champion.model_dir, release_dir, run_dir / CHECKPOINT_DIR, tag
    )
    strategies = trainer.strategies
    resume = checkpoint_to_resume(run_dir / CHECKPOINT_DIR, tag)
    trainer.train(resume_from_checkpoint=resume)
    seconds = trainer.train_seconds  # a resumed run's included

    if not ranks.saves_candidate(trainer, strategies, run_dir, champion.model_dir):
        return TrainResult(  # another rank: rank 0 writes the candidate and the result
            model_dir=run_dir / CANDIDATE_DIR,
            strategy=cfg.strategy,
            steps=trainer.state.global_step,
            train_seconds=seconds,
        )
    out, dtype = save_candidate(step, trainer, tokenizer, strategies, run_dir, champion)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # the candidate supersedes them
    return TrainResult(
        model_dir=out,
        strategy=cfg.strategy,
        steps=trainer.state.global_step,
        train_seconds=seconds,
        log_history=[h for h in trainer.state.log_history if "loss" in h],
        resumed_from_step=trainer.resumed_from_step,
        weights_dtype=dtype,
    )


def checkpoint_tag(step: FinetuneStep, champion: ChampionRef, release_dir: Path) -> str:
    """What a checkpoint was trained for, hashed: the model and train sections of the params
    (but ``checkpoint_steps``), the champion and the release. A checkpoint of another setup
    (params changed, another champion) is not resumed."""
    setup = {
        "model": step.model.model_dump(mode="json"),
        "train": step.train.model_dump(mode="json", exclude={"checkpoint_steps"}),
        "champion": champion.model_dump(mode="json"),
        "release": str(Path(release_dir).resolve()),
    }
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_to_resume(folder: Path, tag: str) -> Path | None:
    """The latest complete checkpoint in ``folder`` written for ``tag`` (None: train from the
    start). Every other checkpoint, incomplete, of another setup or older, is deleted, so the
    Trainer's rotation sees only those of this run."""
    checkpoint, skipped = cf_strategies.latest_checkpoint(folder, tag)
    for passed, why in skipped.items():
        log.warning(f"fine-tune: not resuming from {passed}: {why}")
    if checkpoint is not None:
        log.warning(f"fine-tune: resuming from {checkpoint} (a retry after a crash)")
    cf_strategies.remove_checkpoints(folder, keep=checkpoint)
    return checkpoint


def trained_dtype(args: TrainingArguments) -> torch.dtype:
    """The dtype training computed in: bf16 (or fp16) under mixed precision on a GPU, else
    fp32. The fp32 master weights are cast to it once, when the candidate is saved."""
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def save_candidate(
    step: FinetuneStep,
    trainer,
    tokenizer,
    strategies: list,
    run_dir: Path,
    champion: ChampionRef | None = None,
) -> tuple[Path, str]:
    """Write ``run_dir/candidate_model`` atomically (a ``.partial`` folder renamed): the merged
    weights (or, with a parameter-isolation strategy, the base weights and ``tasks.json``) in
    the dtype training computed in, the tokenizer and ``strategy_state/``. With
    ``registry.weights: adapter`` the LoRA adapter is kept unmerged instead, with ``parent.json``
    naming ``champion`` (its version or base model, and content hash). Returns the folder and
    the dtype's name ("bfloat16", "float32"), which ``config.json`` (``parent.json``) records."""
    dtype = trained_dtype(trainer.args)
    out = run_dir / CANDIDATE_DIR
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cf_strategies.save_strategies(strategies, tmp / STRATEGY_STATE)
    dtype_name = str(dtype).removeprefix("torch.")
    if isolating_spec(step.train.strategy):  # keep the base; the state rebuilds every task
        for s in strategies:
            s.use_task(trainer.model, cf_strategies.BASE)  # progressive: columns off
        trainer.model.unload().to(dtype).save_pretrained(tmp)
        write_tasks_file(tmp, step, strategies)
    elif step.weights == "adapter" and champion is not None:
        trainer.model.save_pretrained(tmp)  # adapter_model.safetensors, adapter_config.json
        link = {"parent": parent_reference(step, champion), "dtype": dtype_name}
        (tmp / ADAPTER_PARENT).write_text(json.dumps(link, indent=1))
    else:  # merged in the fp32 master weights, then cast
        trainer.model.merge_and_unload().to(dtype).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out, dtype_name


def parent_reference(step: FinetuneStep, champion: ChampionRef) -> dict:
    """What an adapter was trained on, for ``parent.json``: the champion's registered version,
    or the base model (its folder, or a hub id), with the content hash of its folder."""
    folder = Path(champion.model_dir)
    digest = content_hash(folder) if folder.is_dir() else None
    if champion.version is not None:
        name = step.model.registered_name
        return {
            "kind": "registered",
            "name": name,
            "version": champion.version,
            "model_uri": f"models:/{name}/{champion.version}",
            "content_sha256": digest,
        }
    model = str(folder.resolve()) if folder.is_dir() else str(champion.model_dir)
    return {"kind": "base", "model": model, "content_sha256": digest}
