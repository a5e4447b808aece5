"""The commands. `train.py` and `inference.py` keep the authors' command lines; every command also runs as
`python -m tlora.<command>` and through one console script:

    tlora train ...        (= train.py)           tlora evaluate ...   (= python -m tlora.evaluate)
    tlora generate ...     (= inference.py)       tlora analyze ...    (= python -m tlora.analyze)
    tlora export ...       (= python -m tlora.export)     tlora estimate, protocol (old name: benchmark), demo,
                                                          tiny likewise
"""

from __future__ import annotations

import importlib
import sys


def train_main(argv: list[str] | None = None) -> int:
    from tlora.common.commands import run_command
    from tlora.train.options import parse_args

    def run(args):
        from tlora.train.tracking import hand_over_secrets
        from tlora.train.trainer import train  # heavy imports only after the input is known to be good

        hand_over_secrets(args)
        return train(args)

    return run_command(parse_args, run, "run folder", argv)


def inference_main(argv: list[str] | None = None) -> int:
    from tlora.common.commands import run_command
    from tlora.generate.inference import parse_args, run

    return run_command(parse_args, run, "samples", argv)


COMMANDS = {
    "train": train_main, "generate": inference_main, "inference": inference_main,
    "export": "tlora.interop.exporting", "evaluate": "tlora.evaluation.scoring", "analyze": "tlora.evaluation.analysis",
    "protocol": "tlora.evaluation.paper_protocol", "benchmark": "tlora.evaluation.paper_protocol",  # its old name
    "demo": "tlora.demo", "tiny": "tlora.families.tiny_models",
    "estimate": "tlora.train.estimator",
}


def main(argv: list[str] | None = None) -> int:
    """`tlora <command> [flags]`."""
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: tlora {{{','.join(COMMANDS)}}} [flags]  (tlora <command> --help for its flags)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    command = COMMANDS[argv[0]]
    if from_shell:  # argparse names the program after argv[0]: `usage: tlora generate ...`
        sys.argv = [f"tlora {argv[0]}", *argv[1:]]
    if isinstance(command, str):
        command = importlib.import_module(command).main
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
