"""FLOP conventions: how many training FLOPs a token costs, four ways, so that the choice is visible.

    llmkit scale sweep scale/cpu-tiny      # sweep.csv holds C under every convention, one column each
    llmkit scale recommend --flops 1e15 --fit runs/scale-cpu-tiny   # prints the recommendation's C four ways

Scaling-law papers disagree on what C counts, and Porian et al. 2024 ("Resolving discrepancies in
compute-optimal scaling of language models", arXiv 2406.19146) traced much of the Kaplan-Chinchilla
disagreement to it: at small sizes the output layer and attention are a large share of the cost.

  6N            6 x N, N in the sweep's param_convention (Kaplan et al. 2020 with non_embedding parameters;
                Hoffmann et al. 2022 with total parameters)
  6N_output     6 x the matmul parameters: the blocks plus the output (unembedding) layer (Porian et al.)
  6N_attention  6 x the matmul parameters + 12 x layers x hidden x seq_len: the attention scores and
                weighted sum, forward and backward (what llmkit's MFU and wall-time estimates use)
  M             DeepSeek LLM 2024's M = 72 n_layer d_model^2 + 6 n_layer l_seq d_model: 6 x the non-embedding
                parameters (no output layer) + 6 x layers x hidden x seq_len (causal attention)

A sweep chooses its convention with `flop_convention`; the fit's N is always the param_convention.
"""

from __future__ import annotations

FLOP_CONVENTIONS = ("6N", "6N_output", "6N_attention", "M")
DESCRIPTIONS = {
    "6N": "6 x N (N in the param_convention)",
    "6N_output": "6 x matmul parameters (with the output layer)",
    "6N_attention": "6 x matmul parameters + 12 x layers x hidden x seq_len",
    "M": "DeepSeek's M: 6 x non-embedding parameters + 6 x layers x hidden x seq_len",
}


def flops_per_token(counts: dict[str, int], layers: int, hidden: int, seq_len: int, param_convention: str) -> dict[str, float]:
    """Training FLOPs per token of one model under every convention (counts: total, non_embedding, matmul)."""
    attention = float(layers) * float(hidden) * float(seq_len)
    return {
        "6N": 6.0 * counts[param_convention],
        "6N_output": 6.0 * counts["matmul"],
        "6N_attention": 6.0 * counts["matmul"] + 12.0 * attention,
        "M": 6.0 * counts["non_embedding"] + 6.0 * attention,
    }


def side_by_side(per_token: dict[str, float], tokens: float) -> str:
    """'6N 1.2e+12 | 6N_output 3.4e+12 | ...': the compute of `tokens` tokens under every convention, on one line."""
    return " | ".join(f"{name} {per_token[name] * tokens:.3g}" for name in FLOP_CONVENTIONS)
