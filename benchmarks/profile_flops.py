"""Params / GFLOPs / activations table, CoConv parity check and (with --latency) forward latency.

Same as ``timm-acsi profile`` (errors too: one line, exit 2 or 1); run ``python benchmarks/profile_flops.py --help``
for the options.
"""

import sys

from timm_acsi.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("profile", sys.argv[1:], prog="benchmarks/profile_flops.py"))
