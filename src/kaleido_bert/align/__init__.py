"""The Attention-based Alignment Generator (paper §3.3): the Show-Attend-Tell captioner and token↔patch alignments."""
