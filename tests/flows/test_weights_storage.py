"""How candidate weights are stored: in the dtype training computed in, once per retrain (the
registered copy), removed for failed versions by the retention policy, and, as an option, as a
LoRA adapter on top of its parent."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import cf_strategies
from flows.core.config import load_params
from flows.core.records import (
    FILES,
    ChampionRef,
    EvalReport,
    TrainResult,
)
from flows.registry import prune, serving
from flows.registry.history import all_versions
from flows.registry.tracking import (
    champion_version,
    client,
    current_champion,
    model_version_dir,
    version_store,
)
from flows.scoring.score_cache import model_key
from flows.steps.finetune import FinetuneStep, finetune, save_candidate
from flows.steps.promote import promote
from tests.conftest import ALL_LINEAR, write_params
from tests.flows.conftest import gated_run, run_cli
from tests.flows.mlflow_server import MlflowServer
from tests.flows.outside_repo import run_outside_repo
from tests.flows.test_serving import prompts_of

RELEASE = "wiki-topics-1"


def safetensors_dtypes(path: Path) -> set[str]:
    """The tensor dtypes a safetensors file's header declares (read without loading it)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def lora_model(model_dir: Path, seed: int = 0):
    """The tiny model with a LoRA adapter whose B is not zero (so merging changes weights)."""
    model, tokenizer = serving.load(model_dir, for_training=True)
    torch.manual_seed(seed)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, tokenizer


def fake_trainer(model, bf16: bool) -> SimpleNamespace:
    """What ``save_candidate`` reads of a Trainer: its model and its mixed-precision flags."""
    return SimpleNamespace(model=model, args=SimpleNamespace(bf16=bf16, fp16=False))


def test_a_candidate_trained_in_bf16_is_stored_and_served_in_bf16(
    params_file, tiny_model_dir, tmp_path
):
    params = load_params(params_file)
    strategies = cf_strategies.build_strategies("naive", {})
    sizes = {}
    for bf16 in (False, True):
        model, tokenizer = lora_model(tiny_model_dir)
        run_dir = tmp_path / ("bf16" if bf16 else "fp32")
        out, dtype = save_candidate(
            FinetuneStep.from_params(params),
            fake_trainer(model, bf16),
            tokenizer,
            strategies,
            run_dir,
        )
        weights = out / "model.safetensors"
        sizes[dtype] = weights.stat().st_size
        expected = "BF16" if bf16 else "F32"
        assert safetensors_dtypes(weights) == {expected}
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        served, _ = serving.load(out)
        assert {p.dtype for p in served.parameters()} == {torch.bfloat16 if bf16 else torch.float32}
    assert set(sizes) == {"float32", "bfloat16"}
    assert sizes["bfloat16"] < 0.55 * sizes["float32"]  # half the bytes, plus a header


def test_bf16_weights_are_the_bf16_cast_of_the_merged_fp32_model(
    params_file, tiny_model_dir, demo_dir, tmp_path
):
    params = load_params(params_file)
    model, tokenizer = lora_model(tiny_model_dir, seed=1)
    expected = {k: v.to(torch.bfloat16) for k, v in model.merge_and_unload().state_dict().items()}
    model, tokenizer = lora_model(tiny_model_dir, seed=1)
    strategies = cf_strategies.build_strategies("naive", {})
    out, _ = save_candidate(
        FinetuneStep.from_params(params), fake_trainer(model, True), tokenizer, strategies, tmp_path
    )
    stored = load_file(str(out / "model.safetensors"))
    assert stored.keys() <= expected.keys() and len(stored) > 10
    assert all(torch.equal(stored[k], expected[k]) for k in stored)
    served, served_tokenizer = serving.load(out)
    answers = serving.generate(served, served_tokenizer, prompts_of(demo_dir, 3), False, 6, 4)
    assert len(set(answers)) > 1  # real, distinct answers in bf16 on the CPU


def test_a_cpu_retrain_stores_fp32_and_records_it(params_file, tiny_model_dir, demo_dir, tmp_path):
    params = load_params(params_file, {"train.max_steps": 2})
    champion = ChampionRef(version=None, model_dir=tiny_model_dir)
    result = finetune(
        FinetuneStep.from_params(params), champion, demo_dir / "releases" / RELEASE, tmp_path
    )
    assert result.weights_dtype == "float32"
    assert safetensors_dtypes(result.model_dir / "model.safetensors") == {"F32"}
    assert serving.load_dtype(result.model_dir) == torch.float32


# Stored once: after registration the run folder keeps a pointer, the registry the weights.


def weight_copies(root: Path, size: int) -> list[Path]:
    """The full copies of a model's weights under ``root``: safetensors files of its size."""
    return sorted(f for f in root.rglob("*.safetensors") if f.stat().st_size == size)


def write_candidate(model_dir: Path, out: Path, seed: int | None) -> Path:
    """A candidate folder: the tiny model, its weights nudged by ``seed`` (None: unchanged)."""
    model, tokenizer = serving.load(model_dir, for_training=True)
    if seed is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "strategy_state").mkdir()  # as a strategy keeps its state: in a folder, safetensors
    save_file({"anchor": torch.zeros(8)}, str(out / "strategy_state" / "ewc.safetensors"))
    return out


def test_a_registered_candidate_is_stored_once_and_resume_promote_rollback_still_work(
    tmp_path, tiny_model_dir, demo_dir, monkeypatch
):
    monkeypatch.setenv("FORGETLESS_USER", "alice")
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)
    params = load_params(params_file)
    ws = params.workspace_dir
    size = (tiny_model_dir / "model.safetensors").stat().st_size

    # A run that stopped after the gate still has its own weights; resume registers them.
    first = ws / "runs" / "first"
    candidate = write_candidate(tiny_model_dir, first / "candidate_model", seed=1)
    content = model_key(candidate)
    gated_run(params, candidate, demo_dir, dvc_hash="a" * 32).write(first)
    assert len(weight_copies(ws, size)) == 1
    code, out = run_cli(params_file, "resume", str(first))
    assert code == 0 and "v1 is now champion" in out, out
    # ... and now they live in the registry alone: the run folder keeps a pointer.
    assert not candidate.exists()
    pointer = json.loads((first / "candidate_model.json").read_text())
    assert pointer["version"] == "1" and pointer["model_uri"] == "models:/forgetless-lm/1"
    assert pointer["bytes"] > size and pointer["weights_dtype"] == "float32"
    (copy,) = weight_copies(ws, size)
    assert copy.is_relative_to(ws / "mlartifacts")
    champion = current_champion(params.model_store)  # read in place: no download into the cache
    assert champion.version == "1" and champion.model_dir.is_relative_to(ws / "mlartifacts")
    assert model_key(champion.model_dir) == content  # so the score cache still hits
    assert not (ws / "cache" / "models").exists()
    assert len(weight_copies(ws, size)) == 1

    # Resume after the weights left the run folder: registration is found again by its key,
    # evaluate reads the registered copy.
    for stage in ("evaluate", "register", "promote"):
        (first / FILES[stage]).unlink()
    code, out = run_cli(params_file, "resume", str(first))
    assert code == 0 and "ran evaluate, register, promote" in out, out
    eval_report = EvalReport.read(first / FILES["evaluate"])
    assert eval_report.new_task == RELEASE and eval_report.eval_seconds > 0
    assert json.loads((first / FILES["register"]).read_text())["version"] in {"1", "2"}
    assert len(weight_copies(ws, size)) == len(
        all_versions(client(params.model_store), "forgetless-lm")
    )

    # A second release from that champion, then a rollback to the first: every version loads.
    second = ws / "runs" / "second"
    start = champion_version(params.model_store)
    candidate = write_candidate(tiny_model_dir, second / "candidate_model", seed=2)
    gated_run(params, candidate, demo_dir, dvc_hash="b" * 32, champion=start).write(second)
    code, out = run_cli(params_file, "resume", str(second))
    assert code == 0 and "is now champion" in out, out
    assert not (second / "candidate_model").exists()
    versions = all_versions(client(params.model_store), "forgetless-lm")
    assert len(weight_copies(ws, size)) == len(versions)  # one copy per version, no more
    code, out = run_cli(params_file, "rollback", "--reason", "test")
    assert code == 0 and f"→ v{start}" in out, out
    champion = current_champion(params.model_store)
    assert champion.version == start and serving.load(champion.model_dir)[0] is not None
    assert len(weight_copies(ws, size)) == len(versions)


@pytest.mark.usefixtures("prefect_harness")
def test_a_retrain_through_the_flow_leaves_one_copy_of_the_weights(
    tmp_path, tiny_model_dir, demo_dir
):
    from flows.drivers.retrain import retrain

    params_file = write_params(
        tmp_path, tiny_model_dir, demo_dir, train={"max_steps": 3}, gate={"beat_champion": False}
    )
    params = load_params(params_file)
    ws = params.workspace_dir
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    summary = retrain(params_file=str(params_file))
    assert summary.promotion.promoted
    pointer = json.loads((summary.run_dir / "candidate_model.json").read_text())
    assert pointer["version"] == summary.registration.version == "1"
    assert not (summary.run_dir / "candidate_model").exists()
    (copy,) = weight_copies(ws, size)  # the registered one, read in place as the champion
    assert current_champion(params.model_store).model_dir == copy.parent
    assert (copy.parent / "strategy_state" / "naive.json").is_file()


def test_with_a_tracking_server_the_weights_live_in_its_store_and_are_fetched_once(
    tmp_path, tiny_model_dir, demo_dir
):
    """A remote artifact store (``mlflow server`` with proxied artifacts): the run folder gives
    its weights up to it, the champion is downloaded once into ``cache/models``, and the
    retention policy removes a failed version's weights over HTTP."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        params_file = write_params(tmp_path, tiny_model_dir, demo_dir, tracking={"uri": server.url})
        params = load_params(params_file)
        ws = params.workspace_dir
        size = (tiny_model_dir / "model.safetensors").stat().st_size
        first = ws / "runs" / "first"
        candidate = write_candidate(tiny_model_dir, first / "candidate_model", seed=1)
        gated_run(params, candidate, demo_dir, dvc_hash="a" * 32).write(first)
        code, out = run_cli(params_file, "resume", str(first))
        assert code == 0 and "v1 is now champion" in out, out
        assert (first / "candidate_model.json").is_file()
        assert weight_copies(ws, size) == []  # in the server's store only
        assert len(weight_copies(server.folder, size)) == 1
        champion = current_champion(params.model_store)
        assert champion.model_dir == ws / "cache" / "models" / "forgetless-lm-v1"
        assert current_champion(params.model_store).model_dir == champion.model_dir  # fetched once
        assert len(weight_copies(ws, size)) == 1 and serving.load(champion.model_dir)

        v2 = retrain_by_hand(params, demo_dir, tiny_model_dir, 2, passed=False)
        v3 = retrain_by_hand(params, demo_dir, tiny_model_dir, 3, passed=True)
        code, out = run_cli(params_file, "prune", "--keep", "1")
        assert code == 0 and "removed the weights of 1 version(s)" in out, out
        assert weights_in_store(params, v2) == [] and weights_in_store(params, v3)
        with pytest.raises(serving.WeightsRemoved, match="retention policy"):
            model_version_dir(params.model_store, v2)
    finally:
        server.stop()


# The retention policy: a failed version's weights go once N newer versions exist.


def retrain_by_hand(
    params,
    demo_dir: Path,
    tiny_model_dir: Path,
    n: int,
    passed: bool,
    train: TrainResult | None = None,
) -> str:
    """Register a candidate of "release-<n>" with the real register step (records made by
    ``gated_run``; the candidate is ``train``'s, else the tiny model nudged), from the current
    champion, and run the real promote step."""
    start = champion_version(params.model_store)
    candidate: Path | TrainResult | None = train
    if candidate is None:
        run_dir = params.workspace_dir / "runs" / f"release-{n}"
        candidate = write_candidate(tiny_model_dir, run_dir / "candidate_model", seed=n)
    run = gated_run(
        params,
        candidate,
        demo_dir,
        release=f"release-{n}",
        dvc_hash=f"{n:032d}",
        champion=start,
        passed=passed,
        new_task_score=0.2 + n / 100,
    )
    reg = run.register(params, Path(run.train.model_dir).parent)
    promote(params.model_store, reg, run.decision, start)
    return reg.version


def weights_in_store(params, version: str) -> list[str]:
    """The weight files a version's model folder holds in the artifact store."""
    repo, path = version_store(params.model_store, version)
    return sorted(f for f in prune.artifact_files(repo, path) if f.endswith(".safetensors"))


def test_the_failed_versions_weights_go_after_n_newer_versions_and_nothing_else(
    tmp_path, tiny_model_dir, demo_dir
):
    params = load_params(
        write_params(tmp_path, tiny_model_dir, demo_dir, registry={"keep_failed_weights": 1})
    )
    c = client(params.model_store)
    v1 = retrain_by_hand(params, demo_dir, tiny_model_dir, 1, passed=True)
    v2 = retrain_by_hand(params, demo_dir, tiny_model_dir, 2, passed=False)
    kept = ["model.safetensors", "strategy_state/ewc.safetensors"]
    assert weights_in_store(params, v2) == kept  # no newer version yet
    v3 = retrain_by_hand(params, demo_dir, tiny_model_dir, 3, passed=True)
    assert champion_version(params.model_store) == v3

    # The failed version: weights gone from the store, everything else still there.
    assert weights_in_store(params, v2) == []
    mv = c.get_model_version("forgetless-lm", v2)
    assert mv.tags["weights"] == "removed" and mv.tags["gate"] == "failed"
    run = c.get_run(mv.run_id)
    assert run.data.metrics["new_task_score"] == pytest.approx(0.22)
    assert run.data.tags["gate"] == "failed"
    assert {"gate_report.json", "eval_report.json"} <= {a.path for a in c.list_artifacts(mv.run_id)}
    for load in (
        lambda: model_version_dir(params.model_store, v2),
        lambda: mlflow.pyfunc.load_model(f"models:/forgetless-lm/{v2}"),
    ):
        with pytest.raises(Exception, match=r"retention policy.*keep_failed_weights: 1") as err:
            load()
        assert f"v{v2} has no weights" in str(err.value) and "retrain" in str(err.value)
    code, out = run_cli(params.root / "params.yaml", "promote", v2, "--force", "--reason", "x")
    assert code == 2 and "retention policy" in out

    # The passed versions (champion, previous champion) keep theirs and still load and answer.
    for v in (v1, v3):
        assert weights_in_store(params, v) == kept
        model = mlflow.pyfunc.load_model(f"models:/forgetless-lm/{v}")
        assert model.predict(["What is the capital of France?"])[0]


def test_prune_dry_run_then_prune_spares_pending_forced_and_passed_versions(
    tmp_path, tiny_model_dir, demo_dir, monkeypatch
):
    monkeypatch.setenv("FORGETLESS_USER", "alice")
    params_file = write_params(tmp_path, tiny_model_dir, demo_dir)  # policy off: nothing goes
    params = load_params(params_file)
    v1 = retrain_by_hand(params, demo_dir, tiny_model_dir, 1, passed=True)
    v2 = retrain_by_hand(params, demo_dir, tiny_model_dir, 2, passed=False)
    v3 = retrain_by_hand(params, demo_dir, tiny_model_dir, 3, passed=False)
    code, _ = run_cli(params_file, "promote", v3, "--force", "--reason", "hotfix")  # forced
    assert code == 0
    v4 = retrain_by_hand(params, demo_dir, tiny_model_dir, 4, passed=False)
    client(params.model_store).set_model_version_tag("forgetless-lm", v4, "promotion", "pending")
    v5 = retrain_by_hand(params, demo_dir, tiny_model_dir, 5, passed=True)
    assert champion_version(params.model_store) == v5  # v3, forced, was champion before it
    kept = {v: weights_in_store(params, v) for v in (v1, v2, v3, v4, v5)}
    both = ["model.safetensors", "strategy_state/ewc.safetensors"]
    assert all(files == both for files in kept.values())  # the policy is off: nothing went

    code, out = run_cli(params_file, "prune", "--keep", "2", "--dry-run")
    assert code == 0 and "would remove" in out, out
    assert "would remove the weights of 1 version(s)" in out
    assert {v: weights_in_store(params, v) for v in kept} == kept  # a dry run removes nothing

    code, out = run_cli(params_file, "prune", "--keep", "2")
    assert code == 0 and "removed the weights of 1 version(s)" in out, out
    assert weights_in_store(params, v2) == []  # failed, 3 newer
    for v in (v1, v3, v4, v5):  # passed, forced champion, pending, passed
        assert weights_in_store(params, v) == kept[v], v
    code, out = run_cli(params_file, "prune", "--keep", "2")  # again: nothing left to remove
    assert code == 0 and "removed the weights of 0 version(s)" in out


# Adapter registration: the LoRA adapter and a reference to its parent, resolved on load.


def two_releases(params, demo_dir: Path, tiny_model_dir: Path) -> list[TrainResult]:
    """Fine-tune (for real) release 1 from the base and release 2 from its champion, each
    registered and promoted by the real steps; the two TrainResults."""
    trained = []
    for n, release in enumerate(["wiki-topics-1", "wiki-topics-2"], start=1):
        champion = current_champion(params.model_store)
        run_dir = params.workspace_dir / "runs" / release
        result = finetune(
            FinetuneStep.from_params(params), champion, demo_dir / "releases" / release, run_dir
        )
        trained.append(result)
        retrain_by_hand(params, demo_dir, tiny_model_dir, n, passed=True, train=result)
    return trained


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_chain_of_adapters_loads_in_a_fresh_process_like_the_merged_models(
    tmp_path, tiny_model_dir, demo_dir
):
    workspaces = {}
    for kind in ("merged", "adapter"):
        (tmp_path / kind).mkdir()
        params = load_params(
            write_params(
                tmp_path / kind,
                tiny_model_dir,
                demo_dir,
                train={"max_steps": 3},
                registry={"weights": kind},
            )
        )
        two_releases(params, demo_dir, tiny_model_dir)
        workspaces[kind] = params
    merged, adapter = workspaces["merged"], workspaces["adapter"]
    c = client(adapter.model_store)
    v2 = c.get_model_version("forgetless-lm", "2")
    assert v2.tags["weights_format"] == "adapter" and v2.tags["parent_version"] == "1"
    assert "base model" in c.get_model_version("forgetless-lm", "1").tags["parent"]

    # The registered artifact is the adapter: a fraction of the merged model's bytes.
    adapter_dir, merged_dir = (
        model_version_dir(adapter.model_store, "2"),
        model_version_dir(merged.model_store, "2"),
    )
    link = json.loads((adapter_dir / "parent.json").read_text())
    assert link["parent"]["version"] == "1" and link["dtype"] == "float32"
    assert link["parent"]["content_sha256"] == model_key(
        model_version_dir(adapter.model_store, "1")
    )
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "model.safetensors").exists()
    weights = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert weights(adapter_dir) < 0.25 * weights(merged_dir)
    assert folder_bytes(adapter_dir) < 0.5 * folder_bytes(merged_dir)

    # Resolved in the pipeline: the same weights, bit for bit, as the merged registration.
    from_chain, _ = serving.load(adapter_dir)
    from_merged, _ = serving.load(merged_dir)
    chain_state, merged_state = from_chain.state_dict(), from_merged.state_dict()
    assert chain_state.keys() == merged_state.keys()
    assert all(torch.equal(chain_state[k], merged_state[k]) for k in merged_state)

    # Resolved in a fresh process outside the repository, through the registry.
    prompts = prompts_of(demo_dir, 4)
    ev = merged.evaluate
    model, tokenizer = serving.load(merged_dir)
    expected = serving.generate(model, tokenizer, prompts, False, ev.max_new_tokens, ev.batch_size)
    body = "out = model.predict(prompts)\n"
    answers = run_outside_repo(
        body, tmp_path / "elsewhere", adapter.tracking_uri, {"prompts": prompts}
    )
    assert answers == expected
    assert len(set(expected)) > 1

    # A missing link is an error naming it.
    c.delete_model_version("forgetless-lm", "1")
    with pytest.raises(FileNotFoundError, match=r"builds on forgetless-lm v1 .*chain is broken"):
        serving.load(adapter_dir)
