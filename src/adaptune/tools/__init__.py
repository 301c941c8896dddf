"""Tools around a trained model: memory estimate, evaluation, generation."""
