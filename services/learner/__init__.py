"""Learner service: the paper's math (advantages, losses, schedules, r⁻ choice) and, later, the FSDP policy."""
