"""Log-probs of the response tokens of teacher sequences under a causal LM (transformers backend).

One batched forward under ``no_grad`` scores many sequences (positive and negative contexts together).
Logits are divided by the rollout temperature before the softmax, so the scores are of the same
distribution the student sampled from. Only the [len(response)] log-probs of the sampled tokens leave this
function — never full-vocabulary logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from services.teacher.sequences import TeacherSequence

__all__ = ["score_sequences"]


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[TeacherSequence],
    *,
    temperature: float = 1.0,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """For every sequence, a float32 tensor of log p(y_t | context, y_<t) at its response positions."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    results: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):  # right padding: positions stay 0..len-1, no position ids needed
            ids[row, : len(seq.input_ids)] = torch.tensor(seq.input_ids)
            attention[row, : len(seq.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
        token_logp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for row, seq in enumerate(chunk):
            # logits at position t − 1 predict token t
            results.append(token_logp[row, seq.response_start - 1 : len(seq.input_ids) - 1].clone())
    return results
