"""T-LoRA itself: the rank schedule and its mask, the adapters and their update (adapters), the settings type
(settings), and attaching adapters to a denoiser by hooks (injection)."""
