"""Int8 rows for a frozen token-embedding table, and the (tied) output head that reads the same rows.

QLoRA quantizes the linear layers; the token embedding, and the output head tied to it, stay in
full precision. On a small model with a large vocabulary that table is most of what is left:
SmolLM2-135M's 49,152 x 576 table is 113 MB in fp32 next to 55 MB of NF4 linear layers. Stored
as one int8 per value plus one scale per row (row absmax / 127: the vector-wise format of
LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339) it is 4x smaller, and it moves validation
perplexity far less than NF4 for the same table would (docs/benchmarks.md).

::

    ids ──► rows[ids] * scale[ids] ──► decoder ──► h ──► h @ (rows * scale).T ──► logits
            Int8Embedding (gathers only              Int8Head (dequantizes one block of
            the rows it needs)                       vocabulary rows at a time)

The price is time where the head runs: each call dequantizes the whole table, a block at a time
(tens of ms for SmolLM2 on a CPU: noticeable in token-by-token generation). So it is opt-in:
``quantize_embeddings(model)``, or ``adaptune train --quantize-embeddings``. The tables are frozen;
``dequantize_embeddings`` (and ``merge_and_unload`` on such a model) puts float ones back, tied
again where they were tied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["Int8Embedding", "Int8Head", "int8_rows_matmul", "quantize_rows", "quantize_embeddings",
           "dequantize_embeddings"]

HEAD_BLOCK_ROWS = 8192  # vocabulary rows dequantized at a time by Int8Head (8192 x 576 fp32 = 19 MB)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 per-row scale) with ``rows * scale[:, None]`` ~= weight; scale = absmax / 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows stay exactly zero
    rows = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return rows, scale


class Int8Embedding(nn.Module):
    """A frozen ``nn.Embedding`` kept as int8 rows + row scales; outputs in the original dtype."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        rows, scale = quantize_rows(weight)
        self.register_buffer("rows", rows)
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.dtype = weight.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.rows).to(self.dtype) * F.embedding(ids, self.scale[:, None]).to(self.dtype)

    def dequantized(self) -> torch.Tensor:
        """The whole table in float."""
        return _dequantized_block(self.rows, self.scale, 0, self.num_embeddings, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, output {self.dtype}"


def _dequantized_block(rows: torch.Tensor, scale: torch.Tensor, start: int, stop: int,
                       dtype: torch.dtype) -> torch.Tensor:
    return rows[start:stop].to(dtype) * scale[start:stop, None].to(dtype)


class _Int8Matmul(torch.autograd.Function):
    """``hidden @ (rows * scale).T`` block by block; backward dequantizes again instead of keeping
    the float table (which autograd would otherwise hold, block by block, until backward)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = hidden.new_empty(*hidden.shape[:-1], rows.shape[0])
        for start in range(0, rows.shape[0], HEAD_BLOCK_ROWS):
            stop = min(start + HEAD_BLOCK_ROWS, rows.shape[0])
            out[..., start:stop] = hidden @ _dequantized_block(rows, scale, start, stop, hidden.dtype).T
        ctx.save_for_backward(rows, scale)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, scale = ctx.saved_tensors
        grad = None
        for start in range(0, rows.shape[0], HEAD_BLOCK_ROWS):
            stop = min(start + HEAD_BLOCK_ROWS, rows.shape[0])
            part = grad_out[..., start:stop] @ _dequantized_block(rows, scale, start, stop, grad_out.dtype)
            grad = part if grad is None else grad.add_(part)
        return grad.to(ctx.hidden_dtype), None, None


def int8_rows_matmul(hidden: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``hidden @ (rows * scale[:, None]).T`` for frozen int8 ``rows`` (out, in) with per-row ``scale``.

    Autograd keeps only the int8 rows and the scales (backward dequantizes again), not ``hidden``:
    the rows are frozen, so no weight gradient needs it. The head uses it, and so do bitsandbytes'
    int8 linear layers on CPU (``quant.keep_trainable_layout``).
    """
    return _Int8Matmul.apply(hidden, rows, scale)


class Int8Head(nn.Module):
    """``h @ table.T + bias`` for an :class:`Int8Embedding` table, one block of rows at a time."""

    def __init__(self, table: Int8Embedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.table = table
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = int8_rows_matmul(hidden, self.table.rows, self.table.scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantize_embeddings(model: nn.Module) -> int:
    """Store ``model``'s frozen input embedding (and its output head) as int8 rows, in place.

    A head tied to the embedding reads the same int8 table; an untied linear head gets its own.
    Returns the number of tables made (0 when the model has no ``nn.Embedding`` input table).
    The tables become frozen buffers. Raises :class:`ConfigError` on an adapter-wrapped model.
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return 0
    if getattr(model, "peft_config", None) is not None:
        raise ConfigError("quantize_embeddings: call it on the base model, before get_peft_model "
                          "(an adapter may train or wrap the embedding and the head)")
    tied = isinstance(head, nn.Linear) and head.weight is emb.weight
    table = Int8Embedding(emb.weight, emb.padding_idx)
    # hooks others put on the table stay (prepare_model_for_kbit_training's "inputs require grad")
    table._forward_hooks.update(emb._forward_hooks)
    table._forward_pre_hooks.update(emb._forward_pre_hooks)
    model.set_input_embeddings(table)
    made = 1
    if isinstance(head, nn.Linear):
        head_table = table if tied else Int8Embedding(head.weight)
        made += 0 if tied else 1
        model.set_output_embeddings(Int8Head(head_table, head.bias))
    return made


def dequantize_embeddings(model: nn.Module) -> bool:
    """Undo :func:`quantize_embeddings`: float ``nn.Embedding`` / ``nn.Linear`` again, tied if they were.

    Returns whether anything was changed. The values are the int8 ones (quantization is lossy).
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    changed = False
    if isinstance(emb, Int8Embedding):
        plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx,
                             device="meta")
        plain.weight = nn.Parameter(emb.dequantized(), requires_grad=False)
        model.set_input_embeddings(plain)
        changed = True
    if isinstance(head, Int8Head):
        linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        if isinstance(emb, Int8Embedding) and head.table is emb:
            linear.weight = model.get_input_embeddings().weight  # tied again
        else:
            linear.weight = nn.Parameter(head.table.dequantized(), requires_grad=False)
        if head.bias is not None:
            linear.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=False)
        model.set_output_embeddings(linear)
        changed = True
    return changed
