"""Model builders: the tiny arithmetic policy (``cepo bootstrap``) and SmolLM2 imported from GGUF."""
