"""The paper's math that runs on the controller, one small pure module per concern.

- ``advantages``: GRPO advantages (Eq. 1), evidence Δ and weights, CEPO / RLSD token advantages (Eqs. 4, 5, 7)
- ``negatives``: r⁻, the answer of a group's lowest-reward rejected rollout (Alg. 1 line 4)
- ``feedback``: the r⁺ / r⁻ texts a teacher context holds (ground truth, a correct peer, a response's part)
- ``schedules``: λ, the evidence dose (§3.4, Fig. 3)
- ``methods``: the method registry — grpo, rlsd, cepo, opsd, sdpo, and any method registered beside them
"""
