"""Adapter methods: which layers to adapt (targets), LoRA and its variants, prompt learning."""
