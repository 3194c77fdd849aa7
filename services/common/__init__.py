"""The library every service shares: the engines (vLLM, transformers) that rollout and teacher both serve, the
replica base that loads adapters by version, the chat templates and the Prometheus metrics endpoint."""
