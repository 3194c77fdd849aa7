"""Typed messages that cross a service boundary (pydantic), and nothing else.

Tensors never travel as JSON lists: they ride inside Ray objects as numpy arrays or torch tensors.
"""

from proto.adapter import AdapterAck, AdapterPayload, checksum_files
from proto.messages import Problem, Verdict

__all__ = ["AdapterAck", "AdapterPayload", "Problem", "Verdict", "checksum_files"]
