"""T-LoRA itself: the rank schedule and its mask, the adapters and their update (adapters), the settings type
(settings), how a denoiser is described to it (denoiser), and attaching adapters to it by hooks (injection)."""
