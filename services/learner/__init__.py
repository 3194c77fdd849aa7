"""Learner service: the LoRA policy, its losses and learning-rate schedule, and the FSDP2 ranks."""
