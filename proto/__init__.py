"""Typed messages that cross a service boundary (pydantic), and nothing else.

Tensors never travel as JSON lists: they ride inside Ray objects as numpy arrays or torch tensors.
"""

from proto.messages import Problem, Verdict

__all__ = ["Problem", "Verdict"]
