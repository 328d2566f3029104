"""Noise schedules, losses and samplers."""
