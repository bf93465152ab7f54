"""Cold-start distillation: teachers that write chains of thought, and trajectory collection."""
