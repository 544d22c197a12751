"""Evaluators for two-tower models; each works on embedding functions and returns named scalars."""
