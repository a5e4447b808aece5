"""Train a T-LoRA on SDXL: `accelerate launch train.py --trainer_type ortho_lora --trainer_class sdxl_tlora ...`."""

import sys

from tlora.options import UsageError, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tlora.training import train  # heavy imports only after the input is known to be good

    folder = train(args)
    print(f"run folder: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
