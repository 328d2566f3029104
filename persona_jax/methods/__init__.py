"""Personalization methods: each is data plus small pure functions (see base.Method)."""
