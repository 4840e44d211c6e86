"""How many channel gathers folding removes from a ResNet-50 with random gates, and that outputs stay equal.

Every DGConv2d of a torchvision ResNet-50 gets random binary gates (seeded), so most
groups are permuted; the model is exported without and with ``fold_permutations``.
The README quotes the counts.

    python examples/fold_resnet50.py [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from nas_grouping import dgconv_layers, export_model
from nas_grouping.graph.fold import count_gathers
from search_spaces import get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = get_space("torchvision", name="resnet50", num_classes=1000).eval()
    gen = torch.Generator().manual_seed(args.seed)
    for _, layer in dgconv_layers(model):
        layer.set_gates(torch.randint(0, 2, (layer.num_gates,), generator=gen).tolist())
    unfolded, folded = export_model(model, fold=False), export_model(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref, out = model(x), folded(x)
    print(f"channel gathers: {count_gathers(unfolded)} unfolded, {count_gathers(folded)} folded; "
          f"max |difference| of the outputs {float((out - ref).abs().max()):.2e} (outputs up to "
          f"{float(ref.abs().max()):.2e})")


if __name__ == "__main__":
    main()
