"""Prompt tuning, P-tuning and prefix tuning."""
