"""``adaptune export``: adapters and merged models as GGUF files for llama.cpp and Ollama.

* ``names``: transformers names -> llama.cpp tensor names, and the layout changes (q/k permutation);
* ``adapter``: an adapter folder as LoRA pairs with their per-layer scale;
* ``gguf_lora``: the LoRA-only adapter GGUF (llama.cpp ``--lora``);
* ``gguf_merged``: the merged model as one GGUF (``hparams`` and ``vocab`` build its metadata when
  the base is not a GGUF file); ``writer``: the streaming, atomic GGUF writer;
* ``ollama``: the Modelfile; ``check``: reading the export back through transformers;
* ``api``: :func:`export`, which the CLI calls.

Nothing heavy is imported until used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FORMATS", "QUANT_CHOICES", "ExportResult", "export"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
