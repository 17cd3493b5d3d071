"""The training engine: one readable loop plus its optimizer, checkpoint and logging helpers."""
