"""Generate with a trained T-LoRA: `python inference.py --config_path RUN/logs/hparams.yml --checkpoint_idx 800
--prompts "a {0} riding a bike#a {0} swimming"`."""

import sys

from tlora.cli import inference_main as main

if __name__ == "__main__":
    sys.exit(main())
