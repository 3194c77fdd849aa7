"""Teacher service: answer-conditioned contexts; their log-probs come from the engines' ``score``."""
