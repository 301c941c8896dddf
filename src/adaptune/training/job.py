"""``adaptune train``'s options: one dataclass (``TrainJob``) holds every choice, so the CLI flags, a
YAML file and Python callers share one meaning and one set of defaults. The defaults are sized for
the main job: the embedded SmolLM2-135M-Instruct on the embedded Shakespeare, a few minutes on two
CPU cores. :func:`adaptune.training.run.run_train` runs a job.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..device import PRECISIONS
from ..errors import ConfigError
from ..schema import conforms, describe_hint
from ..tuners.targets import parse_targets
from .methods import DEFAULT_LR, METHODS

SAMPLE_PROMPT = "Write a few lines in the style of Shakespeare about a king who cannot sleep."

__all__ = ["SAMPLE_PROMPT", "TrainJob"]


@dataclass
class TrainJob:
    """Everything ``adaptune train`` needs; field names are the CLI flags with ``-`` for ``_``."""

    model: str | None = None  # hub id, local folder, .gguf file; None = embedded SmolLM2-135M
    data: str | list | None = None  # file, save_to_disk folder or hub id; a list of sources to mix; None = Shakespeare
    data_config: str | None = None  # a hub dataset's configuration (its subset)
    data_split: str | None = None  # the split of a hub dataset or saved DatasetDict (default train)
    data_format: str | None = None  # text | completion | chat | alpaca | sharegpt; None: detected from the rows
    columns: str | dict[str, str] | None = None  # adaptune name=data column, e.g. prompt=question,completion=answer
    streaming: bool = False  # read, tokenize and pack on the fly (data larger than memory; needs max_steps)
    stream_window: int = 1000  # rows read, packed and shuffled together when streaming
    token_cache: bool = True  # reuse the tokens of an earlier run on the same data, tokenizer and options
    token_cache_dir: str | None = None  # default $ADAPTUNE_TOKEN_CACHE or ~/.cache/adaptune/tokens
    output: str = "runs/adapter"
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] | str | None = None  # None: the architecture's default (q_proj, v_proj...)
    quantize: str | None = None  # nf4 | fp4 | int8
    quantize_embeddings: bool = False  # int8 rows for the frozen embedding and tied head (LoRA-family methods)
    int8_modules: list[str] | str | None = None  # with 4-bit: these layers int8 (e.g. down_proj,v_proj)
    lora_init: str = "default"  # default | loftq (quantized base: start the adapter from the quantization error)
    loftq_iter: int = 5  # LoftQ's alternating iterations (more: a stored base closer to the full weights)
    virtual_tokens: int = 20
    epochs: float = 1.0
    max_steps: int = 60
    lr: float | None = None  # None: DEFAULT_LR[method]
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    packing: bool = True
    train_on_prompt: bool = False
    val_fraction: float = 0.02
    max_examples: int | None = None
    eval_every: int = 30  # validation loss every N steps (plotted in loss.png); 0 = only before and after
    save_every: int = 20
    seed: int = 0
    resume: bool = False
    gradient_checkpointing: bool = False
    sample_prompt: str = SAMPLE_PROMPT
    sample_tokens: int = 48
    dtype: str | None = None
    precision: str = "auto"  # auto | bf16 | fp16 | fp32: the products' precision (autocast)
    logging_steps: int = 5
    trust_remote_code: bool = False  # run Python files that come with the model; only when asked
    report_to: str = "none"  # tensorboard | wandb | mlflow | none, or several comma-separated
    run_name: str | None = None  # the run's name in the trackers
    push_to_hub: str | None = None  # hub repo id to upload the adapter folder to after saving it
    objective: str = "sft"  # sft | dpo | ipo | orpo | simpo | kto (training.preference; --data: pairs / KTO rows)
    beta: float | None = None  # preference objectives; None: the objective's default
    loss_type: str | None = None  # the objective's variant (dpo: sigmoid, hinge, robust, ipo; kto: kto, ...)
    label_smoothing: float = 0.0  # dpo --loss-type robust, simpo
    ref_adapter: str | None = None  # continue this adapter; a frozen copy of it is the reference

    def __post_init__(self) -> None:
        _check_job_types(self)
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        from .preference.options import check_objective  # light: no training stack

        check_objective(self, DEFAULT_LR)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.quantize_embeddings and self.method not in ("lora", "dora", "qlora"):
            raise ConfigError(f"--quantize-embeddings works with lora, dora and qlora; --method {self.method} "
                              "trains or reads the embedding table itself")
        self._check_quantization()
        if self.method == "prefix-tuning" and self.gradient_checkpointing:
            raise ConfigError("--method prefix-tuning does not work with --gradient-checkpointing (the "
                              "checkpointed layers drop the KV cache that carries the prefix); turn one off")
        for name, low in (("r", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 1), ("virtual_tokens", 1),
                          ("logging_steps", 1), ("save_every", 1), ("loftq_iter", 1), ("max_steps", 0),
                          ("eval_every", 0), ("stream_window", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                kind = "a positive integer" if low else "an integer >= 0"
                raise ConfigError(f"--{name.replace('_', '-')} must be {kind}, got {value!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"--max-examples must be a positive integer (or left out for all), "
                              f"got {self.max_examples}")
        if self.max_steps == 0 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"--epochs must be a positive number when --max-steps is 0, got {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        self.targets = parse_targets(self.targets)
        self._check_data_options()

    def _check_data_options(self) -> None:
        from ..data.formats import FORMATS
        from .tracking import parse_report_to

        if self.data_format is not None and self.data_format not in FORMATS:
            raise ConfigError(f"--data-format must be one of {', '.join(FORMATS)}, got {self.data_format!r}")
        if self.streaming and self.max_steps == 0:
            raise ConfigError("--streaming needs --max-steps: a stream has no length to count epochs in")
        if self.streaming and self.max_examples is not None:
            raise ConfigError("--max-examples does not apply to --streaming (--max-steps says how much is read)")
        self.report_to = ",".join(parse_report_to(self.report_to)) or "none"

    @property
    def quantize_kind(self) -> str | None:
        """What the base is stored in: --quantize, or nf4 for --method qlora."""
        return self.quantize or ("nf4" if self.method == "qlora" else None)

    def _check_quantization(self) -> None:
        if isinstance(self.int8_modules, str):
            self.int8_modules = [m.strip() for m in self.int8_modules.split(",") if m.strip()]
        if self.int8_modules and self.quantize_kind not in ("nf4", "fp4"):
            raise ConfigError("--int8-modules mixes int8 layers into a 4-bit base: use it with --method qlora "
                              "or --quantize nf4/fp4")
        if self.lora_init not in ("default", "loftq"):
            raise ConfigError(f"--lora-init must be default or loftq, got {self.lora_init!r}")
        if self.lora_init == "loftq":
            if self.method not in ("lora", "qlora") or self.quantize_kind not in ("nf4", "int8"):
                raise ConfigError("--lora-init loftq starts LoRA from a quantized base's error: use it with "
                                  "--method qlora, or --method lora with --quantize nf4 or int8")
            if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
                raise ConfigError(f"--loftq-iter must be a positive integer, got {self.loftq_iter!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainJob:
        """A YAML mapping of the same field names; command-line overrides win."""
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read YAML config ({exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
            raise ConfigError(f"{p}: cannot read YAML config ({problem}{where})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the YAML config must be a mapping of option names to values")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{p}: unknown options {', '.join(unknown)}")
        data.update(overrides)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None


def _check_job_types(job: TrainJob) -> None:
    """Each option holds a value of its type (a YAML file can hold anything): ConfigError naming it.

    A number written as a string (YAML 1.1 reads ``1e-3`` as a string) is taken as the number.
    """
    hints = typing.get_type_hints(type(job))
    for f in dataclasses.fields(job):
        value, hint = getattr(job, f.name), hints[f.name]
        if isinstance(value, str) and not conforms(value, hint) and conforms(1.5, hint):
            try:
                value = float(value)
            except ValueError:
                pass
            else:
                setattr(job, f.name, value)
        if not conforms(value, hint):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be {describe_hint(hint)}, got {value!r:.80}")
