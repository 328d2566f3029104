"""Faces: insightface's 5-point alignment and the interface face-recognition networks are used through."""
