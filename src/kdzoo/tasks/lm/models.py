"""Causal LMs and tokenizers from Hugging Face `transformers` / `tokenizers` (the ``kdzoo[lm]`` extra).

A model is loaded by name (``AutoModelForCausalLM.from_pretrained``: a hub name such as
``HuggingFaceTB/SmolLM2-135M``, a local transformers directory, or a kdzoo lm run directory, whose
``model/`` holds what ``save_pretrained`` wrote) or built fresh from a Llama or GPT-2 config.  A tokenizer is
byte-level (256 byte symbols + end of text), a byte-level BPE trained on the corpus with `tokenizers`, or
loaded by name the same way as a model.  Teacher and student must share the tokenizer (a run directory keeps
its tokenizer in ``tokenizer/``).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import os
import re
import shutil
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError
from torch import nn

from ...errors import CheckpointError, ConfigError, naming_path
from ...models.pretrained import quiet_progress

EOS = "<|endoftext|>"
MODEL_DIR, TOKENIZER_DIR, ADAPTER_DIR = "model", "tokenizer", "adapter"
# files one of which a folder (or a hub repository) holding a tokenizer has
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")
# transformers config fields that count something (widths, layers, heads, positions): whole numbers >= 1
SIZE_OPTIONS = frozenset({"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "max_position_embeddings", "vocab_size", "head_dim", "n_embd",
                          "n_layer", "n_head", "n_inner", "n_positions", "n_ctx"})
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def require_transformers():
    """The transformers module, or a ConfigError naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("kdzoo lm needs Hugging Face transformers and tokenizers: pip install 'kdzoo[lm]'") from None
    return transformers


def resolve_pretrained(name: str, what: str = MODEL_DIR) -> str:
    """A kdzoo lm run directory resolves to its saved model (or tokenizer); anything else is passed on as is."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / what).is_dir():
        return str(path / what)
    return str(path) if path.is_dir() else name


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a folder, never a hub repository id (``owner/name``): it starts with / . or ~,
    has more than one separator, or its parent folder exists (``runs/typo`` beside an existing ``runs/``)."""
    if name.startswith(("/", ".", "~")) or name.count(os.sep) > 1:
        return True
    return os.sep in name and Path(name).expanduser().parent.is_dir()


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer's files (tokenizer.json / tokenizer_config.json, a vocabulary, a
    sentencepiece model)."""
    return any(file.name in TOKENIZER_FILES or file.suffix == ".model" or file.name.startswith(("tokenizer", "vocab"))
               for file in folder.iterdir() if file.is_file())


def local_source(name: str, what: str, where: str) -> Optional[str]:
    """The folder `name` names, checked to hold a model (`what` MODEL_DIR: a config.json) or a tokenizer
    (TOKENIZER_DIR); a kdzoo lm run directory stands for its ``model/`` or ``tokenizer/``.  None for a hub name.
    A path that does not exist is said to be one, not passed to the hub as a repository id."""
    path = Path(name).expanduser()
    if path.is_dir():
        folder = Path(resolve_pretrained(name, what))
        if what == MODEL_DIR and not (folder / "config.json").is_file():
            raise ConfigError(f"{where} {name!r}: {folder} is not a model folder (no config.json; a kdzoo lm run "
                              "folder holds model/config.json)")
        if what == TOKENIZER_DIR and not has_tokenizer(folder):
            raise ConfigError(f"{where} {name!r}: {folder} has no tokenizer (no tokenizer.json or "
                              "tokenizer_config.json); set tokenizer: {name: byte} (or bpe) or name a tokenizer folder "
                              "in tokenizer.name")
        return str(folder)
    if path.exists():
        raise ConfigError(f"{where} {name!r}: {path} is a file, not a model folder")
    if looks_like_path(name):
        raise ConfigError(f"{where} {name!r}: the folder {path} does not exist")
    return None


def _hub_unreachable(endpoint: str) -> Optional[str]:
    """Why the hub at `endpoint` cannot be reached (one quick connection, no retries), or None when it can or a
    proxy decides."""
    if any(os.environ.get(variable) for variable in PROXY_VARIABLES):
        return None
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        return str(err) or type(err).__name__
    return None


def check_hub_name(name: str, revision: Optional[str], files: tuple[str, ...], where: str) -> None:
    """A hub name that is not in the local cache while the hub cannot be reached is one line here, before
    transformers retries the network for a minute."""
    import huggingface_hub
    from huggingface_hub import constants

    try:
        cached = any(isinstance(huggingface_hub.try_to_load_from_cache(name, file, revision=revision), str)
                     for file in files)
    except ValueError as err:  # HFValidationError: not a repository id either
        raise ConfigError(f"{where} {name!r}: neither an existing folder nor a Hugging Face hub name "
                          f"({_first_line(err)})") from None
    if cached:
        return
    advice = f"download it where there is a network (huggingface-cli download {name}) or give a local folder"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where} {name!r}: not in the local cache of Hugging Face models and cannot be downloaded "
                          f"(HF_HUB_OFFLINE is set); {advice}")
    reason = _hub_unreachable(constants.ENDPOINT)
    if reason is not None:
        raise ConfigError(f"{where} {name!r}: not in the local cache of Hugging Face models and cannot be downloaded "
                          f"({constants.ENDPOINT} cannot be reached: {reason}); {advice}; HF_HUB_OFFLINE=1 keeps "
                          "kdzoo off the network")


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's and transformers' warnings (network retries, download notes) and progress bars off
    around a load whose failure is reported in one line; then as they were."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with quiet_progress():
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# what transformers raises for a folder or repository it cannot read: missing or damaged files
LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError)


def pretrained_source(name: str, what: str, where: str, revision: Optional[str] = None) -> str:
    """What to give ``from_pretrained`` for `name`: a checked local folder, or a hub name that is cached or can be
    downloaded."""
    folder = local_source(name, what, where)
    if folder is not None:
        return folder
    check_hub_name(name, revision, ("config.json",) if what == MODEL_DIR else TOKENIZER_FILES[:2], where)
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


def load_tokenizer(name: str, where: str = "tokenizer"):
    transformers = require_transformers()
    target = pretrained_source(name, TOKENIZER_DIR, where)
    try:
        with quiet_hub():
            tokenizer = transformers.AutoTokenizer.from_pretrained(target, trust_remote_code=False)
    except LOAD_ERRORS as err:
        raise ConfigError(f"{where} {name!r}: {_load_failure(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load_failure(err: Exception, source: Optional[str] = None) -> str:
    """Why transformers could not load a model or tokenizer, in words: a folder or hub repository that ships its own
    Python code is refused (kdzoo loads with ``trust_remote_code=False`` and never asks on standard input); a
    damaged weights file is named."""
    text = str(err)
    if "custom code" in text or "trust_remote_code" in text:
        return ("asks to run its own Python code (auto_map / custom classes); kdzoo never runs remote code: use a "
                "model of a standard transformers architecture")
    files = sorted(Path(source).glob("*.safetensors")) if source and Path(source).is_dir() else []
    if isinstance(err, SafetensorError) and files:
        return f"{', '.join(str(f) for f in files)}: damaged or truncated weights ({_first_line(err)})"
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
    for key in SIZE_OPTIONS.intersection(options):
        value = options[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"model.options.{key}: must be a whole number >= 1, got {value!r}")
    values = dict(options)
    values.setdefault("vocab_size", len(tokenizer))
    eos = tokenizer.eos_token_id
    values.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    if values["vocab_size"] < len(tokenizer):
        raise ConfigError(f"model.options.vocab_size {values['vocab_size']} < tokenizer size {len(tokenizer)}")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return cls(**values)
    except (ValueError, TypeError, StrictDataclassError) as err:  # transformers' own checks of the fields
        cause = getattr(err, "__cause__", None) or err
        raise ConfigError(f"model.options: {_first_line(cause)}") from None


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
        label = f"{where}.name" if where in ("model", "teacher") else where  # the config key, or what it is
        target = pretrained_source(name, MODEL_DIR, label, revision)
        try:
            with quiet_hub():
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    target, revision=revision, attn_implementation=attn, dtype=torch.float32, trust_remote_code=False)
        except LOAD_ERRORS as err:
            raise ConfigError(f"{label} {name!r}: {_load_failure(err, target)}") from None
        check_finite(model, target, where)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < len(tokenizer):
        raise ConfigError(f"{where}: its vocabulary ({vocab}) is smaller than the tokenizer's ({len(tokenizer)})")
    return model


def check_positions(model: nn.Module, seq_len: int, where: str) -> None:
    """Rows longer than a model's learned position embeddings (GPT-2's n_positions) are refused in one line;
    rotary models (Llama) have no such table."""
    limit = getattr(model.config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len {seq_len}: longer than the {limit} positions of {where} (n_positions); "
                          f"set data.seq_len <= {limit}")


def check_finite(model: nn.Module, source: str, where: str) -> None:
    """A loaded model whose weights hold NaN or inf is refused in one line naming its weights file."""
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is None:
        return
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    shown = files[0] if len(files) == 1 else (Path(source) / "model.safetensors" if files else source)
    raise CheckpointError(f"{where}: {shown} holds weights that are not finite (NaN or inf), first in {bad}")


def save_pretrained(model: nn.Module, tokenizer, run_dir: Path) -> None:
    """Write ``run_dir/model`` (transformers ``save_pretrained``, safetensors) and ``run_dir/tokenizer``; each
    directory is written beside and swapped in, so a reader never sees half of one."""
    for sub, obj in ((MODEL_DIR, model), (TOKENIZER_DIR, tokenizer)):
        final, staging = run_dir / sub, run_dir / f".{sub}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        with quiet_progress(), naming_path(final / ("model.safetensors" if sub == MODEL_DIR else "tokenizer")):
            obj.save_pretrained(str(staging))  # a full disk: one line naming the file, not transformers' error
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
    pretrained_source(str(path), MODEL_DIR, "run")  # a folder that holds no model is said to be one first
    tokenizer = tokenizer or load_tokenizer(str(path), where="run")
    return build_model(None, str(path), {}, tokenizer, where="run"), tokenizer
