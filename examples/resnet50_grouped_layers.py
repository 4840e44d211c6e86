"""ResNet-50's own convolutions alone, dense vs grouped on contiguous channels (no gathers), at batch 1 and 32.

Each shape's candidates take turns (``bench.timing.median_ms``), every one in NCHW and
channels-last, and each counts in its faster layout. This is what the README quotes to
show that plain grouped kernels do run faster on these shapes, so the gap in
``nas-grouping bench speed`` comes from elsewhere (the permuted groups' channel gathers).

    python examples/resnet50_grouped_layers.py
"""

from __future__ import annotations

import torch
from torch import nn

from nas_grouping.latency.timer import machine_info, median_ms

#: (in channels, out channels, kernel, input height/width) of ResNet-50 layers
SHAPES = [(1024, 256, 1, 14), (256, 1024, 1, 14), (256, 256, 3, 14), (512, 2048, 1, 7)]


def main() -> None:
    torch.manual_seed(0)
    print(f"{machine_info()}; speed-up of groups=G over dense, each in its faster layout")
    for cin, cout, k, hw in SHAPES:
        for batch in (1, 32):
            fns = {}
            for g in (1, 2, 4):
                for name, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
                    m = nn.Conv2d(cin, cout, k, padding=k // 2, groups=g, bias=False).eval().to(memory_format=fmt)
                    x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=fmt)
                    fns[g, name] = (lambda m=m, x=x: m(x))
            with torch.inference_mode():
                t = median_ms(fns, warmup=2, repeats=7)
            best = {g: min(t[g, "nchw"], t[g, "cl"]) for g in (1, 2, 4)}
            print(f"{cin}->{cout} {k}x{k} @{hw}x{hw} batch {batch}: dense {best[1]:.2f} ms; "
                  + ", ".join(f"G={g}: {best[1] / best[g]:.2f}x" for g in (2, 4)))


if __name__ == "__main__":
    main()
