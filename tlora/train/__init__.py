"""Training: train.py's options (options), choosing what to resume (resume), data order (data), what the
denoiser is conditioned on (conditioning), the Trainer (trainer), stops (stopping), trackers (tracking), timers
(timing)."""
