"""Params / GFLOPs / activations table, CoConv parity check and (with --latency) forward latency.

Same as ``timm-acsi profile``; run ``python benchmarks/profile_flops.py --help`` for the options.
"""

import sys

from timm_acsi.cli.profile import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="benchmarks/profile_flops.py"))
