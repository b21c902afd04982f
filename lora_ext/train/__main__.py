"""`python -m lora_ext.train --config run.toml [--OPTION VALUE ...]`: train a LoRA in this process.

Also the entry point of data-parallel runs: `accelerate launch --multi_gpu --num_processes N -m lora_ext.train ...`
(several GPUs; add accelerate's --num_machines/--machine_rank/--main_process_ip for several nodes). On CPUs, set
ACCELERATE_USE_CPU=true with the same command (gloo); `accelerate launch --cpu --num_processes N` starts only ONE
process (accelerate's simple launcher).
`--dry-run` prints the dataset summary and exits; `--resume RUN_DIR` continues a run; `--json-events` streams the
progress events as JSON lines on stdout (the console progress line goes to stderr).

Exit status: 0 finished (the LoRA is written), 3 cancelled (a checkpoint was saved), 2 an expected error (the message
on stderr, once, says what to do; also the last "error" event), 1 an unexpected crash (traceback on stderr).
Started through lora_ext.train.process (as `python -m lora_ext train` and the WebUI's job runner do), the process
stops with a checkpoint when its runner exits, and keeps training when only its stdout is closed: see that module.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from lora_ext.errors import LoraExtError

EXIT_OK, EXIT_CRASH, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 2, 3


def _quiet_libraries() -> None:
    """Loading bars and notices of diffusers/transformers would bury the progress line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    from lora_ext.train.config import build_parser, config_from_namespace

    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_namespace(ns).validate()
        if config.dry_run:
            from lora_ext.train.loop import dry_run

            dry_run(config, sys.stdout)
            return EXIT_OK
        _quiet_libraries()
        from lora_ext.train.loop import train

        result = train(config, echo=sys.stdout if ns.json_events else None)
    except LoraExtError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if result.status == "finished" else EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
