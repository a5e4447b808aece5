"""Train a T-LoRA with the authors' command line, on any family tlora knows (the model folder says which):
`accelerate launch train.py --trainer_type ortho_lora --trainer_class sdxl_tlora ...`."""

import sys

from tlora.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
