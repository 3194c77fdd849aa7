"""The method registry: each RL method is one entry saying what it needs and how it shapes the update.

A :class:`Method` answers the three questions the controller asks (verl's ``register_adv_est`` /
``get_adv_estimator_fn`` is the model):

1. Which teacher scores does it need? ``token_advantages`` set → the teacher replicas score log P_T⁺ of every
   sampled token, and log P_T⁻ under the wrong answer r⁻ when ``negative_context`` (otherwise log P_S stands in
   for P_T⁻, which is how RLSD is defined). No scores → no teacher replicas are started.
2. How are token advantages formed? ``token_advantages(A, logp_pos, logp_neg, mask, λ, ε_w) → Â`` [B, T]; for a
   method without one every token gets its sequence's GRPO advantage A (Eq. 1).
3. Which teacher weights score? ``teacher_source`` (paper Table 7): ``actor`` (the current policy, synced
   every step), ``synced`` (the actor, synced every ``teacher_sync_every`` steps), ``reference`` (the frozen
   initial policy). The ``teacher`` config section overrides both for ablations.
4. Which extra loss does the learner add? ``learner_loss`` names a distillation term the learner computes
   (``cepo_proto.learner.DISTILL_KINDS``: ``opsd``, ``sdpo``), with the teacher's r⁺ context built per row.

Adding a method is one :func:`register_method` call (in this file for the project's own methods, or anywhere
before the run starts): the config accepts its name, the controller, the console line, the reports and
``cepo compare`` follow from the entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cepo.algorithm.advantages import cepo_token_advantages, rlsd_token_advantages
from cepo_proto.learner import DISTILL_KINDS

__all__ = [
    "TEACHER_SOURCES",
    "Method",
    "TokenAdvantageFn",
    "get_method",
    "method_names",
    "register_method",
    "unregister_method",
]

TEACHER_SOURCES = ("actor", "reference", "synced")

# (A [B], log P_T⁺ [B, T], log P_T⁻ or log P_S [B, T], mask [B, T], λ, ε_w) → Â [B, T]
TokenAdvantageFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor
]


@dataclass(frozen=True)
class Method:
    name: str
    display: str
    learning_rate: float  # the paper's default for the method (App. B, Table 6)
    token_advantages: TokenAdvantageFn | None = None
    negative_context: bool = False
    learner_loss: str | None = None
    teacher_source: str = "actor"
    teacher_sync_every: int = 1

    def __post_init__(self) -> None:
        if self.teacher_source not in TEACHER_SOURCES:
            raise ValueError(
                f"method {self.name}: teacher_source {self.teacher_source!r} is not one of "
                f"{', '.join(TEACHER_SOURCES)}"
            )
        if self.teacher_sync_every < 1:
            raise ValueError(
                f"method {self.name}: teacher_sync_every must be ≥ 1, got {self.teacher_sync_every}"
            )
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"method name must be a non-empty identifier, got {self.name!r}")
        if self.learner_loss is not None and self.learner_loss not in DISTILL_KINDS:
            raise ValueError(
                f"method {self.name}: learner_loss {self.learner_loss!r} is not a learner loss "
                f"({', '.join(DISTILL_KINDS)})"
            )
        if self.negative_context and self.token_advantages is None:
            raise ValueError(f"method {self.name}: negative_context needs token_advantages")

    @property
    def scores_evidence(self) -> bool:
        """The teacher replicas score the sampled tokens (and are started at all)."""
        return self.token_advantages is not None


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace`` to redefine an existing name); returns it."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        allowed = ", ".join(repr(n) for n in _REGISTRY)
        raise ValueError(f"got {name!r}; allowed values: {allowed}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# ------------------------------------------------------------------------------------ the paper's methods
# Paper Table 2 (methods), Table 6 (learning rates: 1e-6, 5e-6 for CEPO), Table 7 (method settings and
# teachers: CEPO and OPSD the actor every step, SDPO an EMA of the actor — kept by the learner — and RLSD the
# actor synced every 50 steps, i.e. for the paper's 50-step run the initial policy throughout).
register_method(Method("grpo", "GRPO", 1e-6))
register_method(
    Method(
        "rlsd",
        "RLSD",
        1e-6,
        token_advantages=rlsd_token_advantages,  # Eq. 4
        teacher_source="synced",
        teacher_sync_every=50,
    )
)
register_method(
    Method("cepo", "CEPO", 5e-6, token_advantages=cepo_token_advantages, negative_context=True)  # Eqs. 5, 7
)
register_method(Method("opsd", "OPSD", 1e-6, learner_loss="opsd"))  # GRPO + full-vocabulary KL (Eq. 3)
register_method(Method("sdpo", "SDPO", 1e-6, learner_loss="sdpo"))  # GRPO + top-k JSD to an EMA teacher
