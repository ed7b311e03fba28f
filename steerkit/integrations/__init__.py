"""Plugins that put steerkit into other engines (vLLM)."""
