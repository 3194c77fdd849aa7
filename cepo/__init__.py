"""CEPO: Contrastive Evidence Policy Optimization — the control plane: the controller running Algorithm 1,
the paper's math that runs there, the method registry, config, data, ledger, reports and the command line."""

__version__ = "0.1.0"
