"""The torchrun entry point: ``torchrun --nproc-per-node N -m worldstereo_core.distributed [--sp S]
<cli command> ...`` joins the process group, then runs :func:`worldstereo_core.cli.main` with the
run's context available through :func:`worldstereo_core.runtime.parallel.current` (what sequence
parallelism does and which rank writes: :mod:`worldstereo_core.runtime.parallel`)."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from . import cli
from .runtime.parallel import init_distributed, shutdown

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--sp``, join the process group, run the CLI command, and leave the group."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m worldstereo_core.distributed", add_help=False)
    parser.add_argument("--sp", type=int, default=None, help="processes per sequence-parallel group (default: all)")
    known, rest = parser.parse_known_args(argv)
    ctx = init_distributed(known.sp)
    log.info("rank %d/%d on %s, sequence-parallel groups of %d", ctx.rank, ctx.world_size, ctx.device, ctx.sp_size)
    try:
        return cli.main(rest)
    finally:
        shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
