"""LoRA, DoRA and rsLoRA: the layer, the tuner that injects it, its files, LoftQ."""
