"""The registered model as an MLflow pyfunc (logged as code, no pickle).

``mlflow.pyfunc.load_model("models:/forgetless-lm@champion").predict(["What is ...?"])``
returns the model's greedy answers. The weights are the ``model_dir`` artifact: a plain
transformers folder (merged LoRA weights, tokenizer, strategy state), stored and served in the
dtype training computed in; or, registered with ``registry.weights: adapter``, a LoRA adapter
whose ``parent.json`` names the model it was trained on, merged onto it when it loads
(``merge_chain``). A folder whose weights the retention policy removed says so when loaded.

Serving by task. A model trained with a parameter-isolation strategy (packnet, progressive)
keeps each release's parameters apart instead of merging them: its folder holds the *base*
weights, the strategies' state (``strategy_state/``) and ``tasks.json`` (the strategy, the LoRA
shape, the tasks learned). :class:`TaskRouter` rebuilds it and answers for one task at a time:

* ``predict(prompts, params={"task": "wiki-topics-1"})``: that release's column or mask;
* ``params={"task": "base"}``: the base weights, i.e. what the model knew before its first
  release (pre-training knowledge; the pipeline scores general-knowledge probes this way);
* no task (the default): the latest release's parameters, the model as last trained;
* an unknown task: an error naming the tasks learned.

A model without per-task parameters answers every task with its one set of weights.

This file is the model's whole code: it imports only torch, transformers, pandas and mlflow,
never ``flows``, so the model loads and serves outside this repository; a model with tasks also
imports peft and ``cf_strategies``, which is logged with it (``code_paths``). ``format_prompt``
and ``generate`` give the same answers as ``flows.scoring.scoring.generate`` (a test compares them).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
TASKS_FILE = "tasks.json"  # beside the weights of a model that keeps parameters per task
STRATEGY_STATE = "strategy_state"  # the strategies' state, beside the weights
BASE_TASK = "base"  # the task name a request uses for the base weights
WEIGHTS_REMOVED = "WEIGHTS_REMOVED.json"  # left where the retention policy removed weights
ADAPTER_PARENT = "parent.json"  # beside a LoRA adapter registered without merging
MAX_CHAIN = 1000  # links followed from an adapter to its root before giving up
INPUT_EXAMPLE = pd.DataFrame({INPUT_COLUMN: ["What is the capital of France?"]})


def signature(max_new_tokens: int) -> ModelSignature:
    """Strings in (one column, unnamed so that a plain list or string passes the schema; a
    table's column is ``prompt``), one string answer out; ``max_new_tokens`` and ``task``
    (empty: the default task) are params."""
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", max_new_tokens), ParamSpec("task", "string", "")]
        ),
    )


class WeightsRemoved(FileNotFoundError):
    """A registered version whose weights the retention policy removed (``flows/registry/prune.py``)."""


def check_weights_kept(model_dir: str | Path) -> None:
    """Refuse, with the retention policy's own words, a folder whose weights were removed (the
    policy leaves ``WEIGHTS_REMOVED.json`` in their place)."""
    marker = Path(model_dir) / WEIGHTS_REMOVED
    if marker.is_file():
        raise WeightsRemoved(json.loads(marker.read_text())["message"])


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a model folder's weights are stored in (``dtype`` in its ``config.json``, which
    ``save_pretrained`` writes, or in an adapter's ``parent.json``; fp32 when it says nothing)."""
    config = {}
    for name in ("config.json", ADAPTER_PARENT):  # an adapter records its merged model's dtype
        if (Path(model_dir) / name).is_file():
            config = json.loads((Path(model_dir) / name).read_text())
            break
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_dtype(model_dir: str | Path, for_training: bool = False) -> torch.dtype:
    """fp32 to train (the optimizer keeps its own precision); to answer, the dtype the weights
    were stored in (a model trained in bf16 answers in bf16, on the CPU too), and an fp32 model
    in bf16 on a GPU that supports it."""
    if for_training:
        return torch.float32
    stored = stored_dtype(model_dir)
    if stored != torch.float32:
        return stored
    on_gpu = torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def default_device() -> str:
    """Where models answer: the GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    model_dir: str | Path,
    for_training: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
):
    """Model and tokenizer from a transformers folder, in ``dtype`` (default ``load_dtype``), on
    ``device`` (the GPU when there is one, else the CPU); eval mode to answer.
    Python code shipped with a model (``auto_map`` in its config) runs only with
    ``trust_remote_code`` (``model.trust_remote_code`` in params.yaml); otherwise such a model
    is refused before any of its code is imported."""
    check_weights_kept(model_dir)
    device = device or default_device()
    dtype = dtype or load_dtype(model_dir, for_training)
    if (Path(model_dir) / ADAPTER_PARENT).is_file():  # an adapter: merged onto its parents
        model, tokenizer = merge_chain(model_dir, trust_remote_code)
        model.to(dtype)
    else:
        model, tokenizer = from_pretrained(model_dir, dtype, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch.device(device))
    if not for_training:
        model.eval()
    return model, tokenizer


# transformers' from_pretrained swaps process-wide state while it builds a model (torch's default
# dtype, PreTrainedModel.tie_weights, the init functions): two loads in threads at once (parallel
# candidates, parallel scoring) leave lm_head on the meta device or weights in the other load's
# dtype (every one of 30 mixed-dtype loads in 6 threads, measured); a swap undone out of order
# leaves tie_weights off for the whole process. One load at a time, flows/registry/model_source.py's too.
LOADING = threading.Lock()


def from_pretrained(model_dir: str | Path, dtype: torch.dtype, trust_remote_code: bool):
    """Model and tokenizer of a plain transformers folder, in ``dtype``, on the CPU."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code
        )
        with LOADING:
            model = AutoModelForCausalLM.from_pretrained(  # safetensors only: never unpickle
                str(model_dir),
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
    except ValueError as err:
        if "trust_remote_code" not in str(err) or trust_remote_code:
            raise
        raise ValueError(
            f"the model at {model_dir} ships its own Python code (auto_map in its config), "
            "which is not run by default; set model.trust_remote_code: true in params.yaml only "
            "if you trust that code"
        ) from err
    return model, tokenizer


# Adapter registration (``registry.weights: adapter``): a model folder holds a LoRA adapter, its
# tokenizer and strategy state, and ``parent.json``: the model it was trained on (a registered
# version, or the base model) with that model's content hash, and the dtype the merged model is
# stored in. Loading follows the links back to a full model and merges each adapter in turn.


def content_hash(folder: str | Path) -> str:
    """sha256 of every file under ``folder`` (relative paths and contents, in path order); also
    the score cache's model key (``flows/scoring/score_cache.py``)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def describe(ref: dict[str, Any]) -> str:
    """A parent reference in words."""
    if ref.get("kind") == "registered":
        return f"{ref['name']} v{ref['version']} ({ref['model_uri']})"
    return f"the base model {ref.get('model')!r}"


def registered_weights(name: str, version: str, downloads: ExitStack) -> Path:
    """The weights folder (``model_dir`` artifact) of a registered version: read in place from
    an artifact store on this machine, else downloaded into a temporary folder that
    ``downloads`` removes."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    location = MlflowClient().get_model_version_download_uri(name, version)
    repo = get_artifact_repository(location)
    tmp = Path(downloads.enter_context(tempfile.TemporaryDirectory()))
    weights = model_dir_artifact(Path(repo.download_artifacts("MLmodel", str(tmp))).parent)
    if isinstance(repo, LocalArtifactRepository):
        return Path(repo.artifact_dir) / weights
    return Path(repo.download_artifacts(weights, str(tmp / "weights")))


def parent_folder(ref: dict[str, Any], child: Path, downloads: ExitStack) -> Path:
    """The folder of the model an adapter was trained on; a link that cannot be followed is an
    error naming the adapter, the parent and what to do."""
    if ref.get("kind") == "registered":
        try:
            return registered_weights(ref["name"], str(ref["version"]), downloads)
        except Exception as exc:
            raise FileNotFoundError(
                f"the adapter at {child} builds on {describe(ref)}, which the registry at "
                f"{mlflow.get_registry_uri()} cannot give ({type(exc).__name__}: {exc}); the "
                "chain is broken: restore that version (or point MLFLOW_TRACKING_URI at its "
                "registry), or register models with registry.weights: merged"
            ) from exc
    model = str(ref.get("model"))
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as exc:
        raise FileNotFoundError(
            f"the adapter chain of {child} starts at the base model {model!r}, which is neither "
            f"a folder on this machine nor in the Hugging Face cache ({type(exc).__name__}: "
            f"{exc}); put the base model there, or register models with registry.weights: merged"
        ) from exc


def adapter_chain(model_dir: str | Path, downloads: ExitStack) -> list[Path]:
    """The folders a model is built from, root (a full model) first and ``model_dir`` last,
    following ``parent.json`` links; each parent's content hash must be the one its adapter
    recorded when it was trained."""
    chain = [Path(model_dir)]
    while (chain[-1] / ADAPTER_PARENT).is_file():
        if len(chain) > MAX_CHAIN:
            raise ValueError(f"the adapter chain of {model_dir} is over {MAX_CHAIN} links long")
        ref = json.loads((chain[-1] / ADAPTER_PARENT).read_text())["parent"]
        parent = parent_folder(ref, chain[-1], downloads)
        check_weights_kept(parent)
        expected, found = ref.get("content_sha256"), content_hash(parent)
        if expected and found != expected:
            raise ValueError(
                f"the adapter at {chain[-1]} was trained on {describe(ref)} with content hash "
                f"{expected[:12]}, but {parent} now hashes to {found[:12]}: its parent changed, "
                "so the adapter no longer gives the model that was registered"
            )
        chain.append(parent)
    return chain[::-1]


def merge_chain(model_dir: str | Path, trust_remote_code: bool = False):
    """Model (fp32) and tokenizer of an adapter folder: its root loaded in fp32, then each
    adapter merged and rounded to the dtype its merged model is stored in, as a merged
    registration would have stored it; the tokenizer is the last adapter's."""
    from peft import PeftModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with ExitStack() as downloads:
        root, *adapters = adapter_chain(model_dir, downloads)
        model, _ = from_pretrained(root, torch.float32, trust_remote_code)
        model.to(device)  # merged where the candidate was: the same bits
        devices = list(range(torch.cuda.device_count()))
        with torch.random.fork_rng(devices=devices):  # training after this draws as if merged
            for adapter in adapters:
                check_weights_kept(adapter)
                model = PeftModel.from_pretrained(
                    model, str(adapter), low_cpu_mem_usage=True
                ).merge_and_unload()
                model.to(stored_dtype(adapter)).to(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return model, tokenizer


class TaskRouter:
    """A model that keeps parameters per task (``tasks.json`` in its folder), answering for one
    task at a time: ``with router.answering(task) as model: ...``. The folder's weights are the
    base model's; the strategies named in ``tasks.json`` rebuild each task's parameters from
    their saved state (a LoRA adapter of the recorded shape is put on first when they act on
    one, as packnet does)."""

    def __init__(self, model, model_dir: str | Path, spec: dict[str, Any]):
        import cf_strategies  # logged with a model that has tasks (code_paths)

        if spec.get("lora"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **spec["lora"]))
            model.eval()
        self.strategies = cf_strategies.build_strategies(
            spec["strategy"], spec.get("strategy_params", {})
        )
        cf_strategies.load_strategies(self.strategies, Path(model_dir) / STRATEGY_STATE)
        self.tasks: list[str] = list(spec["tasks"])
        self.model = model
        for s in self.strategies:
            s.use_task(model, None)

    def resolve(self, task: str | None) -> str | None:
        """The task a request names, as the strategies take it: None (the latest) for no task,
        ``cf_strategies.base.BASE`` for ``"base"``; an unknown name is an error."""
        from cf_strategies.base import BASE

        if not task:
            return None
        if task in self.tasks:
            return task
        if task == BASE_TASK:
            return BASE
        raise ValueError(
            f"unknown task {task!r}: this model answers for the tasks {self.tasks}, "
            f"{BASE_TASK!r} (the base weights), or no task (the latest, {self.tasks[-1]!r})"
        )

    @contextmanager
    def answering(self, task: str | None) -> Iterator[Any]:
        """The model answering with ``task``'s parameters inside the block."""
        import cf_strategies

        with cf_strategies.using_task(self.strategies, self.model, self.resolve(task)):
            yield self.model


def model_dir_artifact(model_root: str | Path) -> str:
    """The path of the weights folder (the ``model_dir`` artifact) in a registered pyfunc model's
    folder, read from its ``MLmodel``."""
    flavor = mlflow.models.Model.load(str(model_root)).flavors["python_function"]
    return flavor["artifacts"]["model_dir"]["path"]


def tasks_spec(model_dir: str | Path) -> dict[str, Any] | None:
    """A model's ``tasks.json`` (strategy, options, LoRA shape, tasks learned), or None for a
    model without per-task parameters."""
    tasks_file = Path(model_dir) / TASKS_FILE
    return json.loads(tasks_file.read_text()) if tasks_file.is_file() else None


def learned_tasks(model_dir: str | Path) -> list[str] | None:
    """The tasks a model keeps parameters for, or None for a model without."""
    spec = tasks_spec(model_dir)
    return None if spec is None else list(spec["tasks"])


def load_for_serving(
    model_dir: str | Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> tuple[Any, Any, TaskRouter | None]:
    """Model, tokenizer and, for a model that keeps parameters per task, its router (the
    model is then ``router.model``, which may wrap the loaded one); ``dtype`` and ``device``
    as :func:`load` (the gate scores two models under one setting of both)."""
    model, tokenizer = load(
        model_dir, trust_remote_code=trust_remote_code, device=device, dtype=dtype
    )
    spec = tasks_spec(model_dir)
    if spec is None:
        return model, tokenizer, None
    router = TaskRouter(model, model_dir, spec)
    return router.model, tokenizer, router


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
        self.model, self.tokenizer, self.router = load_for_serving(
            context.artifacts["model_dir"], bool(config.get("trust_remote_code", False))
        )
        self.use_chat_template = bool(config.get("use_chat_template", True))
        self.max_new_tokens = int(config.get("max_new_tokens", 32))
        self.batch_size = int(config.get("batch_size", 8))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        """Greedy answers, one per prompt; ``params={"max_new_tokens": n}`` lengthens them and
        ``params={"task": name}`` picks the task of a model that keeps parameters per task."""
        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens") or self.max_new_tokens)
        prompts = as_prompts(model_input)
        if self.router is None:
            return self._generate(self.model, prompts, max_new_tokens)
        with self.router.answering(params.get("task") or None) as model:
            return self._generate(model, prompts, max_new_tokens)

    def _generate(self, model, prompts: list[str], max_new_tokens: int) -> list[str]:
        return generate(
            model, self.tokenizer, prompts, self.use_chat_template, max_new_tokens, self.batch_size
        )


mlflow.models.set_model(ForgetlessLM())
