"""Prefect flows, configuration and the `forgeline` CLI: they coordinate; Ray workers compute."""

from flows._env import apply_defaults

apply_defaults()
