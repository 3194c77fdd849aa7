"""The pipeline's services: rollout, teacher, verifier, learner. They meet only through ``proto``."""
