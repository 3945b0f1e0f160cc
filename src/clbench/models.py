"""Loading causal language models and tokenizers: one code path for hub names and local paths.

``load_model`` calls ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` with
whatever ``name_or_path`` the config gives (a hub id such as ``meta-llama/Meta-Llama-3-8B`` on a cluster,
or a local directory), so real runs and the tests share it. ``kind: random`` builds a model from a config
in-process instead (``tiny_llama``), for fast tests without weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from clbench.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def asset_path(name: str) -> str:
    """Path of a file or directory shipped in ``clbench/assets`` (e.g. the stories260k model)."""
    return str(resources.files("clbench") / "assets" / name)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_model_config(cfg: DictConfig) -> None:
    """Fail early on a model config that cannot load: a missing local path, unknown kind or dtype."""
    resolve_dtype(cfg.dtype)
    if cfg.kind not in ("pretrained", "random"):
        raise ConfigError(f"model.kind={cfg.kind!r} must be 'pretrained' or 'random'")
    paths = [cfg.tokenizer] if cfg.kind == "random" else [cfg.name_or_path, cfg.get("tokenizer") or cfg.name_or_path]
    for path in paths:
        # Anything that looks like a filesystem path must exist; otherwise it is a hub id.
        looks_local = os.path.isabs(path) or path.startswith((".", "~"))
        if looks_local and not Path(path).expanduser().exists():
            raise ConfigError(f"model path {path!r} (model.name_or_path / model.tokenizer) does not exist")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        # Llama-style tokenizers have no pad token; padding positions are masked out everywhere.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_model(cfg: DictConfig, device: torch.device | None = None) -> LoadedModel:
    """Load the model and tokenizer described by a ``conf/model`` config."""
    check_model_config(cfg)
    dtype = resolve_dtype(cfg.dtype)
    device = device or resolve_device(cfg.device)
    if cfg.kind == "random":
        tokenizer = load_tokenizer(cfg.tokenizer)
        arch: dict[str, Any] = OmegaConf.to_container(cfg.architecture, resolve=True)  # type: ignore[assignment]
        config = AutoConfig.for_model(**arch, vocab_size=len(tokenizer))
        torch.manual_seed(cfg.init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        tokenizer = load_tokenizer(cfg.get("tokenizer") or cfg.name_or_path)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model.to(device), tokenizer=tokenizer)
