"""CEPO: Contrastive Evidence Policy Optimization — the controller and the command line."""

__version__ = "0.1.0"
