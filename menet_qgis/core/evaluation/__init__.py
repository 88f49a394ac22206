"""Accuracy: metrics, and maps or models scored against references (Assess accuracy)."""
