"""A reward for pipeline tests on a random model (whose answers are never right): half the rollouts rewarded,
by response length, so groups have A ≠ 0 and the teacher scores rows."""


def by_length(response: str, reference: str) -> float:
    return float(len(response) % 2)
