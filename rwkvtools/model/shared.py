"""Shared (recursive) linears with per-layer LoRA relaxation; registered with
model.linear.register_linear. Filled by the recursive transform."""
