"""Adapter configs, read and written as peft's ``adapter_config.json``.

The dataclasses carry peft's field names and defaults so that a peft user changes only the import
line, and so that files move both ways. Loading is lenient where peft is lenient (unknown keys
from newer writers are dropped with a warning) and strict where a silent mistake would cost a
training run (types and ranges are checked, with one clear line naming the field).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import AdapterFileError, ConfigError
from .schema import conforms, describe_hint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

PEFT_VERSION = "0.17.0"  # the peft format revision our files follow (written as peft_version)


class _ValueEnum(str, enum.Enum):
    """Prints as its value (``LORA``, not ``PeftType.LORA``) in messages and f-strings."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class TaskType(_ValueEnum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(_ValueEnum):
    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"


@dataclass
class PeftConfig:
    """Fields every adapter kind shares."""

    peft_type: PeftType | str | None = None
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    is_prompt_learning: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ConfigError(
                    f"task_type {self.task_type!r} is not one of "
                    f"{', '.join(t.value for t in TaskType)}"
                ) from None

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        out["peft_version"] = PEFT_VERSION
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        from .atomic import atomic_write_json

        data = self.to_dict()
        data["inference_mode"] = True
        atomic_write_json(Path(directory) / CONFIG_NAME, data, sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PeftConfig:
        """Build the right config class from a dict; unknown keys are dropped with a warning."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        target_cls = cls
        if cls is PeftConfig:
            peft_type = data.get("peft_type")
            target_cls = CONFIG_CLASSES.get(str(peft_type)) if peft_type is not None else None
            if target_cls is None:
                known = ", ".join(CONFIG_CLASSES)
                raise ConfigError(f"{source}: unknown peft_type {peft_type!r} (adaptune reads {known})")
        names = {f.name for f in dataclasses.fields(target_cls)}
        unknown = sorted(k for k in set(data) - names if not _is_inert_foreign_field(k, data[k]))
        if unknown:
            warnings.warn(
                f"{source}: ignoring fields adaptune does not know: {', '.join(unknown)}",
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            config = target_cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        _check_field_types(config, source)
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, subfolder: str | None = None) -> PeftConfig:
        path = Path(directory) / (subfolder or "") / CONFIG_NAME
        if not path.is_file():
            raise AdapterFileError(f"{path}: no adapter config here (is this an adapter folder?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise AdapterFileError(f"{path}: not valid JSON (nested too deeply)") from None
        return cls.from_dict(data, source=str(path))


def _check_field_types(config: PeftConfig, source: str) -> None:
    """Every field of a config read from a file holds a value of its declared type (ConfigError).

    The dataclasses accept anything from Python callers; a file is checked field by field, so a
    wrong type is one line naming the file and the field, not a crash when the adapter is used.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not conforms(value, hints.get(f.name, Any)):
            raise ConfigError(f"{source}: {f.name} must be {describe_hint(hints[f.name])}, got {value!r:.80}")


# Fields peft writes that carry no information for adaptune when left at these values.
_INERT_FOREIGN_FIELDS = {"peft_version", "auto_mapping", "megatron_core", "qalora_group_size",
                         "init_weights"}


def _is_inert_foreign_field(name: str, value: Any) -> bool:
    """True for a field adaptune lacks but may drop silently: an unused peft feature at rest."""
    return name in _INERT_FOREIGN_FIELDS or value is None or value is False or value in ({}, [])


def _check_type(name: str, value: Any, types: tuple[type, ...], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{name} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{name} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")


@dataclass
class LoftQConfig:
    """LoftQ (arXiv:2310.08659, see ``loftq.py``): the stored base's bits and the alternating
    iterations, by peft's names. ``loftq_bits_pattern`` is adaptune's: bits per module, keyed like
    ``rank_pattern`` (``{"down_proj": 8}`` keeps MLP down-projections int8); peft reads only the two
    fields it knows from the ``loftq_config`` object of ``adapter_config.json``."""

    loftq_bits: int = 4
    loftq_iter: int = 1
    loftq_bits_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in (("loftq_bits", self.loftq_bits), *((f"loftq_bits_pattern[{k!r}]", v)
                                                              for k, v in self.loftq_bits_pattern.items())):
            if value not in (4, 8) or isinstance(value, bool):
                raise ConfigError(f"{name} must be 4 (nf4) or 8 (int8), got {value!r}")
        if not isinstance(self.loftq_iter, int) or isinstance(self.loftq_iter, bool) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_iter must be a positive integer, got {self.loftq_iter!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not out["loftq_bits_pattern"]:
            del out["loftq_bits_pattern"]  # written only when used, so the object is peft's own
        return out


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021, arXiv:2106.09685), with DoRA (Liu et al. 2024, arXiv:2402.09353)
    and rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) switches. Field names are peft's."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    loftq_config: dict[str, Any] | LoftQConfig = field(default_factory=dict)  # with init_lora_weights="loftq"
    # adaptune's own field: output slices of fused projections (GPT-2 "q_attn" -> c_attn rows),
    # {module suffix: [slice names]}. peft ignores it; adaptune uses it to reload sliced adapters.
    fused_slices: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA
        _check_type("r", self.r, (int,))
        if self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r}")
        _check_type("lora_alpha", self.lora_alpha, (int, float))
        _check_type("lora_dropout", self.lora_dropout, (int, float))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            _check_type(name, getattr(self, name), (bool,))
        if self.init_lora_weights not in (True, False, "gaussian", "pissa", "loftq") and not (
            isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith("pissa_niter_")
        ):
            raise ConfigError(f"init_lora_weights must be True, False, 'gaussian', 'loftq' or 'pissa', "
                              f"got {self.init_lora_weights!r}")
        self._check_loftq()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            _check_type(name, value, (list, tuple, set, str), allow_none=True)
            if isinstance(value, (list, tuple, set)):
                if not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{name} must hold strings, got {value!r}")
                setattr(self, name, sorted(set(value)))
        _check_type("modules_to_save", self.modules_to_save, (list, tuple), allow_none=True)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        _check_type("layers_to_transform", self.layers_to_transform, (list, tuple), allow_none=True)
        _check_type("rank_pattern", self.rank_pattern, (dict,))
        _check_type("alpha_pattern", self.alpha_pattern, (dict,))
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    def _check_loftq(self) -> None:
        _check_type("loftq_config", self.loftq_config, (dict, LoftQConfig))
        if self.init_lora_weights != "loftq":
            if self.loftq_config:
                warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'", stacklevel=4)
                self.loftq_config = {}
            return
        if not self.loftq_config:
            raise ConfigError("init_lora_weights='loftq' needs loftq_config=LoftQConfig(...)")
        loftq = self.loftq
        if self.use_dora:
            raise ConfigError("LoftQ initialises plain LoRA adapters; it cannot be combined with use_dora")
        self.loftq_config = loftq.to_dict()  # stored as a dict, as peft stores it

    @property
    def loftq(self) -> LoftQConfig | None:
        """The LoftQ settings as a ``LoftQConfig`` (None unless ``init_lora_weights='loftq'``)."""
        if self.init_lora_weights != "loftq":
            return None
        if isinstance(self.loftq_config, LoftQConfig):
            return self.loftq_config
        known = {f.name for f in dataclasses.fields(LoftQConfig)}  # peft may add fields of its own
        try:
            return LoftQConfig(**{k: v for k, v in self.loftq_config.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"loftq_config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("fused_slices") is None:
            # adaptune's own field, written only when used: peft warns about every unknown key
            # ("saved using a higher version... upgrade PEFT"), which would be noise for plain adapters
            del out["fused_slices"]
        return out


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by prompt tuning, P-tuning and prefix tuning (peft's names)."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    is_prompt_learning: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_type("num_virtual_tokens", self.num_virtual_tokens, (int,))
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021, arXiv:2104.08691): trained virtual token embeddings."""

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        if hasattr(self.prompt_tuning_init, "value"):
            self.prompt_tuning_init = self.prompt_tuning_init.value
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ConfigError(f"prompt_tuning_init must be RANDOM or TEXT, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")


class PromptTuningInit(_ValueEnum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021, arXiv:2103.10385): virtual tokens through an MLP or LSTM."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        if hasattr(self.encoder_reparameterization_type, "value"):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.value
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ConfigError(
                f"encoder_reparameterization_type must be MLP or LSTM, got {self.encoder_reparameterization_type!r}"
            )


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trained keys/values in every layer."""

    init_weights: str | None = None  # None: random; "zero": a prefix of zeros
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


CONFIG_CLASSES: dict[str, type[PeftConfig]] = {
    PeftType.LORA.value: LoraConfig,
    PeftType.PROMPT_TUNING.value: PromptTuningConfig,
    PeftType.P_TUNING.value: PromptEncoderConfig,
    PeftType.PREFIX_TUNING.value: PrefixTuningConfig,
}
