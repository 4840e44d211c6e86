"""A CIFAR ResNet-56 at batch 32 timed alone, with glibc's default malloc and with freed memory kept.

Each setting runs in a fresh process (the setting applies to a whole process):
``NAS_GROUPING_MALLOC=system`` leaves glibc's defaults, otherwise ``keep_freed_memory``
applies. The README and ``keep_freed_memory``'s doc quote this.

    python examples/freed_memory_timing.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
from nas_grouping.latency.measure import keep_freed_memory, measure_ms
from search_spaces import get_space
kept = keep_freed_memory()
model = get_space("resnet56", num_classes=10, dense=True).eval()
for _ in range({rounds}):
    ms = measure_ms(model, (3, 32, 32), batch=32, layouts=("channels_last",), repeats=7, warmup=3)
    print(f"kept={{kept}} {{ms['channels_last']:.1f}} ms")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="medians per process (7 repetitions each)")
    args = parser.parse_args()
    for setting in ("system", "keep"):
        env = {**os.environ, "NAS_GROUPING_MALLOC": setting}
        out = subprocess.run([sys.executable, "-c", CHILD.format(rounds=args.rounds)], env=env, check=True,
                             capture_output=True, text=True).stdout
        print(f"NAS_GROUPING_MALLOC={setting}: " + "; ".join(out.split("\n")[:-1]))


if __name__ == "__main__":
    main()
