"""Teacher service: answer-conditioned contexts and the log-probs of the student's tokens under them."""
