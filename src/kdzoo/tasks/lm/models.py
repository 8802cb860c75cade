"""Causal LMs and tokenizers from Hugging Face `transformers` / `tokenizers` (the ``kdzoo[lm]`` extra).

A model is loaded by name (``AutoModelForCausalLM.from_pretrained``: a hub name such as
``HuggingFaceTB/SmolLM2-135M``, a local transformers directory, or a kdzoo lm run directory, whose
``model/`` holds what ``save_pretrained`` wrote) or built fresh from a Llama or GPT-2 config.  A tokenizer is
byte-level (256 byte symbols + end of text), a byte-level BPE trained on the corpus with `tokenizers`, or
loaded by name the same way as a model.  Teacher and student must share the tokenizer (a run directory keeps
its tokenizer in ``tokenizer/``).
"""
from __future__ import annotations

import copy
import difflib
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...models.pretrained import quiet_progress

EOS = "<|endoftext|>"
MODEL_DIR, TOKENIZER_DIR, ADAPTER_DIR = "model", "tokenizer", "adapter"


def require_transformers():
    """The transformers module, or a ConfigError naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("kdzoo lm needs Hugging Face transformers and tokenizers: pip install 'kdzoo[lm]'") from None
    return transformers


def resolve_pretrained(name: str, what: str = MODEL_DIR) -> str:
    """A kdzoo lm run directory resolves to its saved model (or tokenizer); anything else is passed on as is."""
    path = Path(name)
    if path.is_dir() and (path / what).is_dir():
        return str(path / what)
    return name


# ---------------------------------------------------------------- tokenizers


def train_tokenizer(texts: list[str], kind: str = "bpe", vocab_size: int = 512):
    """A byte-level tokenizer trained on `texts`: ``byte`` keeps the 256 byte symbols, ``bpe`` adds merges up to
    `vocab_size` entries.  Deterministic for the same texts."""
    require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "byte":
        vocab_size = len(alphabet) + 1
    elif vocab_size < len(alphabet) + 1:
        raise ConfigError(f"tokenizer.vocab_size: a byte-level BPE needs at least {len(alphabet) + 1}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def load_tokenizer(name: str):
    transformers = require_transformers()
    target = resolve_pretrained(name, TOKENIZER_DIR)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {name!r}: {_load_failure(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_failure(err: Exception) -> str:
    """Why transformers could not load a model or tokenizer, in words: a folder or hub repository that ships its own
    Python code is refused (kdzoo loads with ``trust_remote_code=False`` and never asks on standard input)."""
    text = str(err)
    if "custom code" in text or "trust_remote_code" in text:
        return ("asks to run its own Python code (auto_map / custom classes); kdzoo never runs remote code: use a "
                "model of a standard transformers architecture")
    return f"cannot be loaded ({_first_line(err)})"


# ---------------------------------------------------------------- models


def build_config(arch: str, options: dict[str, Any], tokenizer) -> Any:
    """A transformers config from kdzoo options; an option the config class does not have is a ConfigError."""
    transformers = require_transformers()
    cls = {"llama": transformers.LlamaConfig, "gpt2": transformers.GPT2Config}[arch]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"model.options: {key!r} is not a {cls.__name__} field"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    values = dict(options)
    values.setdefault("vocab_size", len(tokenizer))
    eos = tokenizer.eos_token_id
    values.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    if values["vocab_size"] < len(tokenizer):
        raise ConfigError(f"model.options.vocab_size {values['vocab_size']} < tokenizer size {len(tokenizer)}")
    return cls(**values)


def build_model(arch: Optional[str], name: Optional[str], options: dict[str, Any], tokenizer,
                eager_attention: bool = False, revision: Optional[str] = None, where: str = "model") -> nn.Module:
    """A causal LM: built from `arch` + `options`, or loaded from `name`.  `eager_attention` makes attention
    probabilities available (``output_attentions``), which the fused kernels do not return."""
    transformers = require_transformers()
    attn = "eager" if eager_attention else "sdpa"
    if arch is not None:
        config = build_config(arch, options, tokenizer)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    else:
        target = resolve_pretrained(name)
        try:
            with quiet_progress():
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    target, revision=revision, attn_implementation=attn, dtype=torch.float32, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{where}.name {name!r}: {_load_failure(err)}") from None
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < len(tokenizer):
        raise ConfigError(f"{where}: its vocabulary ({vocab}) is smaller than the tokenizer's ({len(tokenizer)})")
    return model


def save_pretrained(model: nn.Module, tokenizer, run_dir: Path) -> None:
    """Write ``run_dir/model`` (transformers ``save_pretrained``, safetensors) and ``run_dir/tokenizer``; each
    directory is written beside and swapped in, so a reader never sees half of one."""
    for sub, obj in ((MODEL_DIR, model), (TOKENIZER_DIR, tokenizer)):
        final, staging = run_dir / sub, run_dir / f".{sub}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        with quiet_progress():
            obj.save_pretrained(str(staging))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)


def adapt_student(model: nn.Module, spec: Any) -> nn.Module:
    """The student as configured to train: input embeddings frozen (`freeze_embeddings`; a tied head with them),
    and/or LoRA adapters on a frozen base through peft (`lora: {r, alpha, dropout, target_modules}`; unset target
    modules: peft's defaults for the architecture, e.g. q_proj/v_proj in Llama)."""
    if spec.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if spec.lora is None:
        return model
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'kdzoo[lm]'") from None
    options = dict(spec.lora)  # keys checked by LMModelConfig.validate
    config = peft.LoraConfig(r=int(options.get("r", 8)), lora_alpha=float(options.get("alpha", 16)),
                             lora_dropout=float(options.get("dropout", 0.0)),
                             target_modules=options.get("target_modules"), task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"model.lora: {_first_line(err)}") from None


def is_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "merge_and_unload", None))


def export_student(model: nn.Module, tokenizer, run_dir: Path) -> None:
    """``run_dir/model`` and ``run_dir/tokenizer`` (`save_pretrained`); a LoRA student is written with its adapters
    merged into the weights (a plain transformers model), and the adapters alone in ``run_dir/adapter``."""
    if not is_peft(model):
        save_pretrained(model, tokenizer, run_dir)
        return
    final, staging = run_dir / ADAPTER_DIR, run_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    save_pretrained(copy.deepcopy(model).merge_and_unload(), tokenizer, run_dir)


def value_projection(model: nn.Module, layer: int) -> tuple[str, Optional[int]]:
    """Module path that outputs layer `layer`'s attention values, and where the values start in its output
    (None: the whole output).  Llama-style models have ``...layers.N.self_attn.v_proj``; GPT-2 a fused
    ``...h.N.attn.c_attn`` whose output is [queries | keys | values]."""
    separate = re.compile(rf"(^|\.)layers\.{layer}\.self_attn\.v_proj$")
    fused = re.compile(rf"(^|\.)h\.{layer}\.attn\.c_attn$")
    for path, _ in model.named_modules():
        if separate.search(path):
            return path, None
        if fused.search(path):
            return path, 2 * int(model.config.hidden_size)
    raise ConfigError(f"minilm: cannot find the value projection of layer {layer} in {type(model).__name__} "
                      "(known layouts: Llama-style self_attn.v_proj, GPT-2 attn.c_attn)")


def load_trained(run_dir: str | Path, tokenizer=None) -> tuple[nn.Module, Any]:
    """A model and tokenizer saved by ``kdzoo lm train/distill`` (or any transformers directory)."""
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory")
    tokenizer = tokenizer or load_tokenizer(str(path))
    return build_model(None, str(path), {}, tokenizer, where=str(path)), tokenizer
