"""BitNet b1.58: ternary weights, int8 activations, QAT layers and export to transformers' BitNet format."""
