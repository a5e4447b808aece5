"""Generating with a T-LoRA: the Python API (api), sampling and the samples layout (generation), inference.py
(inference), and the exact schedule in stock diffusers (scheduled)."""
