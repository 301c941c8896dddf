"""``--check``: read the exported merged GGUF back and compare it with the model it came from.

The file is loaded by transformers' own GGUF reader (``from_pretrained(..., gguf_file=...)``), an
implementation independent of the writer, so a wrong tensor name, layout or permutation shows up as
a logit difference. Both models score the same sample text; the largest logit difference and the
two perplexities are reported, and the check fails past a tolerance set by the quant type (f32
should reproduce the model; 8- and 4-bit types lose some precision by design).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AdaptuneError

# quant -> (largest relative perplexity change, largest logit difference or None to not bound it)
TOLERANCES: dict[str, tuple[float, float | None]] = {
    "f32": (1e-4, 1e-3),
    "f16": (0.01, None),
    "bf16": (0.03, None),
    "q8_0": (0.02, None),
    "4-bit": (0.25, None),  # --quant source of a 4/5-bit or k-quant GGUF: every merged weight re-rounded
}
_TYPE_LABELS = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
_PRECISION = ["f32", "f16", "bf16", "q8_0", "4-bit"]


def tolerance_label(quant: str, path: str | Path) -> str:
    """The TOLERANCES key for a file: ``quant``, or for ``source`` its coarsest weight type."""
    if quant != "source":
        return quant
    import gguf

    labels = {_TYPE_LABELS.get(t.tensor_type.name, "4-bit") for t in gguf.GGUFReader(str(path)).tensors
              if len(t.shape) > 1}
    return max(labels, key=_PRECISION.index) if labels else "f32"


class ExportCheckFailed(AdaptuneError):
    """The exported GGUF does not compute what the in-memory model computes (within tolerance)."""


@dataclass
class CheckReport:
    quant: str
    tokens: int
    max_logit_diff: float
    ppl_reference: float
    ppl_gguf: float
    top1_agreement: float
    tolerance_key: str = ""  # TOLERANCES key: the quant, or for "source" the file's coarsest type

    def __post_init__(self) -> None:
        self.tolerance_key = self.tolerance_key or self.quant

    @property
    def ppl_change(self) -> float:
        return self.ppl_gguf / self.ppl_reference - 1.0

    @property
    def passed(self) -> bool:
        ppl_tol, logit_tol = TOLERANCES[self.tolerance_key]
        return abs(self.ppl_change) <= ppl_tol and (logit_tol is None or self.max_logit_diff <= logit_tol)

    def line(self) -> str:
        ppl_tol, logit_tol = TOLERANCES[self.tolerance_key]
        kind = self.quant if self.tolerance_key == self.quant else f"{self.quant}, {self.tolerance_key}"
        bound = f", max logit diff <= {logit_tol:g}" if logit_tol is not None else ""
        return (f"check ({kind}, {self.tokens} tokens): max |logit diff| {self.max_logit_diff:.4g}, "
                f"top-1 agreement {100 * self.top1_agreement:.1f}%, perplexity {self.ppl_gguf:.4f} vs "
                f"{self.ppl_reference:.4f} in memory ({100 * self.ppl_change:+.3f}%; tolerance "
                f"{100 * ppl_tol:g}%{bound}): {'passed' if self.passed else 'FAILED'}")


def sample_ids(tokenizer: Any, n_tokens: int = 256, text: str | None = None) -> torch.Tensor:
    """``n_tokens`` token ids of sample text (the bundled Shakespeare unless ``text``)."""
    if text is None:
        from ..data import default_data_path

        text = default_data_path().read_text(encoding="utf-8")[:20 * n_tokens]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits (tokens, vocab) for one sequence."""
    model.eval()
    return model(input_ids=ids, use_cache=False).logits[0].float()


def perplexity_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    return math.exp(loss.item())


def load_gguf_model(path: str | Path) -> torch.nn.Module:
    """The GGUF file as a float32 transformers model."""
    import gguf
    from transformers import AutoModelForCausalLM

    path = Path(path)
    extra = {}
    fields = gguf.GGUFReader(str(path)).fields
    if fields["general.architecture"].contents() == "gpt2":
        # transformers maps gpt2.context_length to n_ctx, which GPT2Config no longer reads: the
        # position table would come out 1024 rows long and refuse the file's
        extra["n_positions"] = int(fields["gpt2.context_length"].contents())
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                **extra).eval()


def check_merged(path: str | Path, reference: torch.nn.Module, tokenizer: Any, quant: str,
                 n_tokens: int = 256) -> CheckReport:
    """Compare the GGUF at ``path`` with ``reference`` (the merged model in memory)."""
    config = reference.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    ids = sample_ids(tokenizer, min(n_tokens, context or n_tokens))
    ref = logits_of(reference, ids)
    exported = load_gguf_model(path)
    got = logits_of(exported, ids)
    del exported
    if got.shape != ref.shape:
        raise ExportCheckFailed(f"the GGUF read back gives logits of shape {tuple(got.shape)}, the model "
                                f"{tuple(ref.shape)}")
    return CheckReport(quant=quant, tolerance_key=tolerance_label(quant, path), tokens=int(ids.shape[1]),
                       max_logit_diff=float((got - ref).abs().max()), ppl_reference=perplexity_of(ref, ids),
                       ppl_gguf=perplexity_of(got, ids),
                       top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).float().mean()))
