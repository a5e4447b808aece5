"""What a run leaves on disk: weights files (weights), the one reader of every T-LoRA file (reading), run folders
and their hparams.yml (run_folder), whole-or-nothing checkpoints and resume state (checkpoint_state), and
SimpleTuner / LyCORIS files (lycoris)."""
