"""WiSE on the embedded demo, after the fact: interpolate a naive candidate toward the base.

``wise`` with LoRA gives W⁰ + mix·ΔW (the adapter starts at B = 0 and only B is interpolated),
which is exactly the interpolation of the merged naive candidate with the base weights, so one
naive training serves every ``mix``. Scores each on the probe set and new-task eval set of
``smollm2_demo.py`` (run that first, with naive) and writes ``results/smollm2_wise_sweep.json``.

    python benchmarks/smollm2_demo.py --strategies naive
    python benchmarks/smollm2_wise_sweep.py --mix 0.35 0.5 0.65
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from flows.core.config import load_params
from flows.demo.build import build_demo, demo_releases, general_knowledge_source
from flows.registry.model_source import resolve_model
from flows.steps.evaluate import EvaluateStep, retention, score_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "smollm2_wise_sweep.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", type=float, nargs="+", default=[0.35, 0.5, 0.65])
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-smollm2")
    ap.add_argument(
        "--naive", type=Path, default=None, help="default: <work>/naive/candidate_model"
    )
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml", {"workspace": str(args.work / "ws")})
    # the strategy tables were measured on the general-knowledge source alone: keep it so
    params = params.with_overrides(
        {"probes.sources": [str(general_knowledge_source(params.path(params.data.demo_dir)))]}
    )
    release = demo_releases(build_demo(params.path(params.data.demo_dir)))[0]
    base = Path(resolve_model(params.model.base, params.path(params.model.cache_dir)))
    naive = args.naive or args.work / "naive" / "candidate_model"
    baseline = json.loads((ROOT / "benchmarks" / "results" / "smollm2_demo.json").read_text())
    w0 = load_file(str(base / "model.safetensors"))
    w1 = load_file(str(naive / "model.safetensors"))
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for mix in args.mix:
        folder = args.work / f"wise-{mix}"
        shutil.copytree(naive, folder, dirs_exist_ok=True)
        mixed = {k: (w0[k].float().lerp(w1[k].float(), mix)).to(w1[k].dtype) for k in w1}
        save_file(mixed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        probes = args.work / "probe_set.jsonl"
        scores = score_model(
            EvaluateStep.from_params(params), folder, probes, release, folder / "scores"
        )
        results[f"wise mix={mix}"] = {
            "new_task": scores.new_task_score,
            "probe_scores": scores.probe_scores,
            "retention": {
                t: retention(scores.probe_scores.get(t, 0.0), b)
                for t, b in baseline["baseline"]["probes"].items()
            },
        }
        print(mix, json.dumps(results[f"wise mix={mix}"]), flush=True)
        OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
