"""Teacher service: the replica that scores the student's sampled tokens under answer-conditioned contexts."""
