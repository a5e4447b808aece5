"""Measuring what a T-LoRA does: the paper's metrics (metrics, evaluate), pictures of a run (analyze), and the
paper's protocol as one command (manifest: what to run; protocol: running it; report: the results)."""
