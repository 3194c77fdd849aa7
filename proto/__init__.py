"""Typed messages that cross a service boundary (pydantic), and nothing else.

- ``messages``: Problem, Verdict
- ``pipeline``: SamplingSpec, generate / grade / teacher requests and results, StepReport, STAGES
- ``learner``: UpdateRequest (batch + UpdateSettings + DistillSpec) and UpdateResult (stats + adapter)
- ``adapter``: AdapterPayload (a PEFT adapter's bytes, versioned and checksummed) and AdapterAck

The folder ``proto/`` is imported as ``cepo_proto`` (see pyproject.toml: proto-plus owns the name ``proto``).

Tensors never travel as JSON lists: they ride inside Ray objects as numpy arrays or torch tensors.
"""

from cepo_proto.adapter import AdapterAck, AdapterPayload, checksum_files
from cepo_proto.messages import Problem, Verdict

__all__ = ["AdapterAck", "AdapterPayload", "Problem", "Verdict", "checksum_files"]
