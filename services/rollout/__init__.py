"""Rollout service: generation engines (vLLM, transformers) and the replica actor."""
