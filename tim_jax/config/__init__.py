"""Configs: every knob with its default, and the objects a config builds."""
