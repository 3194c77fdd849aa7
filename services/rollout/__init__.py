"""Rollout service: the replica that generates G responses per prompt with the adapter version it serves."""
