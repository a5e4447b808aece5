"""What a run leaves on disk: a run folder as one value and the resolver from any path to its checkpoint
(run_folder), our checkpoint keys (keys), weights files written and read (weights), the one reader of a T-LoRA's
settings (reading), whole-or-nothing checkpoints and resume state (checkpoint_state), and SimpleTuner / LyCORIS
files (lycoris)."""
