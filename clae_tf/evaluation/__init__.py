"""Evaluation of an encoder: features, weighted kNN and the linear probe (evaluate), the robust
suite over method/attacks (robust) with its gradient-masking checks (masking), and what a
running job shows in TensorBoard (monitor, visualize). Imports runtime/, data/ and method/."""
