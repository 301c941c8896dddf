"""QLoRA: a 4-bit (or 8-bit) frozen base model under full-precision LoRA adapters.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) keeps the base weights in 4-bit NormalFloat
(``nf4``, optionally with the per-block scales quantized again: "double quantization"), computes
each base matmul in ``compute_dtype`` after dequantizing a layer's weight on the fly, and trains
ordinary LoRA adapters in full precision on top. bitsandbytes holds and multiplies the quantized
weights; transformers loads a model into them (``from_pretrained(..., quantization_config=...)``).
This module is the glue, with peft's names:

The package, with peft's names where peft has them:

* ``bnb.py``: is bitsandbytes usable here, ``bnb_config`` (the ``BitsAndBytesConfig`` for nf4, fp4
  or int8), quantizing a model already in memory (``quantize_linears``: some layers int8, the
  rest 4-bit; LoftQ needs this to choose what each layer stores), and the bytes weights take;
* ``kbit.py``: ``prepare_model_for_kbit_training`` (peft's recipe) and the layout bitsandbytes
  must keep on a CPU for training;
* ``dequant.py``: dequantized weights and whole models, what ``merge_and_unload`` uses to fold
  adapters into a quantized base. The result is a full-precision model (peft instead re-quantizes
  the merged weight, losing the adapter's small updates again);
* ``int8_embedding.py``: int8 rows for the frozen embedding table and a head tied to it;
* ``kinds.py``: which modules are quantized layers (by class name: bitsandbytes is not imported).

LoRA parameters on a quantized base are float32, as in peft: LoRA creates them in the base
weight's dtype when that is a float dtype, and ``Params4bit`` / ``Int8Params`` are integer
storage. The LoRA branch casts its input to float32 and its output back to the base output's
dtype, which is the dtype of the layer input (bitsandbytes computes in ``compute_dtype`` and
casts back). So an fp32 model with compute dtype fp32 is fp32 end to end; a bf16 model with
compute dtype bf16 computes base matmuls in bf16 and the adapter in fp32.
"""

from .bnb import QUANTIZE_CHOICES, bnb_config, quantize_linears, require_bitsandbytes, weight_bytes
from .dequant import dequantize_model, dequantize_weight
from .kbit import prepare_model_for_kbit_training
from .kinds import QUANT_KINDS, has_quantized_layers, layer_kind

__all__ = ["QUANTIZE_CHOICES", "QUANT_KINDS", "bnb_config", "dequantize_model", "dequantize_weight",
           "has_quantized_layers", "layer_kind", "prepare_model_for_kbit_training", "quantize_linears",
           "require_bitsandbytes", "weight_bytes"]
