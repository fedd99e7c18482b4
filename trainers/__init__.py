"""Offline work: scanner simulation, losses, training loops, evaluation."""
