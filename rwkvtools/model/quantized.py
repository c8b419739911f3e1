"""Quantized linears (int8, int4, ggml blocks) built from the tensors a quantized checkpoint
stores; registered with model.linear.register_linear. Filled by the quantize transform."""
