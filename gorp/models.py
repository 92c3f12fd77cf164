"""Load language models from local paths and resolve the modules each method trains.

Only local folders are read (``from_pretrained`` on a path, ``local_files_only=True``); ``trust_remote_code`` is off
unless the caller turns it on. Weights are safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Per architecture family: the LoRA targets (attention query/value) and the full-rank weights GORP trains.
# Names are module-name suffixes matched at a '.' boundary.
ARCH_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"lora": ("self_attn.q_proj", "self_attn.v_proj"), "full_rank": ("mlp.gate_proj",)},
    "t5": {"lora": ("SelfAttention.q", "SelfAttention.v"), "full_rank": ("EncDecAttention.q", "EncDecAttention.v")},
}
# model_type -> family: LLaMA-style decoders share module names.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "smollm3": "llama",
    "t5": "t5",
    "mt5": "t5",
}


@dataclass(frozen=True)
class Targets:
    """Module names (full dotted names in the model) that a method adapts."""

    lora: tuple[str, ...]
    full_rank: tuple[str, ...]
    linear: tuple[str, ...] = field(default=())  # every nn.Linear inside the transformer blocks


PEFT_PREFIX = "base_model.model."


def strip_peft(name: str) -> str:
    """Module/parameter name in the underlying model (PEFT wraps it as base_model.model.<name>)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the model's own nn.Linear layers, seen through PEFT wrappers (adapter layers themselves excluded)."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or ".lora_" in name:
            continue
        name = strip_peft(name)
        out.append(name[: -len(".base_layer")] if name.endswith(".base_layer") else name)
    return out


def family_of(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return FAMILIES.get(model_type)


def _match(names: list[str], suffix: str) -> list[str]:
    return [n for n in names if n == suffix or n.endswith("." + suffix)]


def resolve_targets(
    model: nn.Module,
    lora: tuple[str, ...] | list[str] | None = None,
    full_rank: tuple[str, ...] | list[str] | None = None,
) -> Targets:
    """Full module names for the LoRA and full-rank targets; explicit suffixes override the architecture defaults.

    Raises ValueError naming the suffix when a target matches no nn.Linear in the model.
    """
    linear_names = linear_module_names(model)
    fam = family_of(model)
    defaults = ARCH_TARGETS.get(fam) if fam else None
    if defaults is None and (lora is None or full_rank is None):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"no default target modules for model type {model_type!r} (known: {sorted(FAMILIES)}); "
            "name them explicitly (lora_targets / full_rank_targets)"
        )
    out = {}
    for key, given in (("lora", lora), ("full_rank", full_rank)):
        suffixes = tuple(given) if given is not None else defaults[key]
        found: list[str] = []
        for suffix in suffixes:
            hits = _match(linear_names, suffix)
            if not hits:
                sample = ", ".join(linear_names[:6])
                raise ValueError(
                    f"target module {suffix!r} ({key}) matches no nn.Linear in the model; linear modules look like: "
                    f"{sample}, ..."
                )
            found += hits
        out[key] = tuple(sorted(set(found), key=linear_names.index))
    blocks = tuple(n for n in linear_names if ".layers." in n or ".block." in n)
    return Targets(lora=out["lora"], full_rank=out["full_rank"], linear=blocks)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
):
    """(model, tokenizer) from a local folder; a causal LM, or a seq2seq model when the config says encoder-decoder.

    Weights are safetensors. A folder with only ``pytorch_model.bin`` (a pickle) is refused unless
    ``allow_pickle_weights``; then it is read with ``torch.load(weights_only=True)`` (tensors only, no code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist (models load from local paths only)")
    pickled = not any(path.glob("*.safetensors")) and any(path.glob("*.bin"))
    if pickled and not allow_pickle_weights:
        raise ValueError(
            f"{path} holds pickled weights ({', '.join(sorted(p.name for p in path.glob('*.bin')))}), no safetensors: "
            "convert them, or opt in with allow_pickle_weights=True (loaded with weights_only)"
        )
    kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(path, **kw)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    weights = {"use_safetensors": False, "weights_only": True} if pickled else {"use_safetensors": True}
    model = auto.from_pretrained(path, dtype=dtype, **weights, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_from_state_dict(cls: type, config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """A model of class ``cls`` (a ``PreTrainedModel``) and ``config`` holding ``state_dict``'s tensors (not copies):
    built on the meta device, so nothing is initialized twice and nothing is read from disk. Tied weights are tied,
    non-persistent buffers (rotary frequencies) computed; in eval mode, like ``from_pretrained``."""
    return cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder block's activations in the backward pass instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``, one checkpoint per block; in place, returns ``model``).

    Uses Transformers' own per-layer checkpointing (``GradientCheckpointingLayer``), which wraps each block's
    ``forward``, not its ``__call__``: module hooks (FSDP2's all-gather and reshard) stay outside the checkpoint, so it
    composes with :func:`gorp.fsdp.shard_model` (call this first) and with PEFT adapters (seen through the wrapper; the
    non-reentrant variant needs no input that requires grad). Parameter names do not change, so task memory and
    state dicts are unaffected. The KV cache is off while checkpointing (the replay would append to it twice).

    Order in a stage: ``method.setup_task`` (adds the adapters), then this, then ``shard_model``. Enabled before PEFT
    wraps the model it works too, but PEFT then also makes the embedding output require grad (a reentrant-checkpoint
    workaround this variant does not need).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support activation checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
