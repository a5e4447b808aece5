"""Generate with a trained T-LoRA: `python inference.py --config_path RUN/logs/hparams.yml --checkpoint_idx 800
--prompts "a {0} riding a bike#a {0} swimming"`."""

import sys

from tlora.options import UsageError


def main(argv: list[str] | None = None) -> int:
    from tlora.inference import parse_args, run

    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"samples: {run(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
