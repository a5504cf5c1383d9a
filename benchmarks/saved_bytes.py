"""Bytes that a fused block's forward saves for its backward, on GoogLeNet's nine blocks and
Inception-v3's eleven: torchvision blocks with BN in eval mode (folded), parameters and
input requiring grad, channels_last fp32, random weights.

    PYTHONPATH=. python benchmarks/saved_bytes.py [--batch 8]

Counts each distinct storage once (torch.autograd.graph.saved_tensors_hooks), so a view of
a saved tensor costs nothing extra; the parameters themselves are included, as autograd
keeps them alive either way.
"""

import argparse

import torch
import torchvision

import inception_fast as ifast

V3_SIZES = {"Mixed_5b": 35, "Mixed_5c": 35, "Mixed_5d": 35, "Mixed_6a": 35, "Mixed_6b": 17, "Mixed_6c": 17,
            "Mixed_6d": 17, "Mixed_6e": 17, "Mixed_7a": 17, "Mixed_7b": 8, "Mixed_7c": 8}
GOOGLENET_BLOCKS = {"3a": ("inception3a", 28), "3b": ("inception3b", 28), "4a": ("inception4a", 14),
                    "4b": ("inception4b", 14), "4c": ("inception4c", 14), "4d": ("inception4d", 14),
                    "4e": ("inception4e", 14), "5a": ("inception5a", 7), "5b": ("inception5b", 7)}


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    googlenet = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    v3 = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True).eval()
    rows = [(f"googlenet {name}", getattr(googlenet, attr), size) for name, (attr, size) in GOOGLENET_BLOCKS.items()]
    rows += [(f"inception_v3 {name}", getattr(v3, name), size) for name, size in V3_SIZES.items()]
    print("| block | batch | saved MB (fused, BN folded) | x + output MB |\n|---|---:|---:|---:|")
    for name, block, size in rows:
        swapped = ifast.swap_inception(torch.nn.Sequential(block), backend="cpu")[0]
        x = torch.randn(args.batch, _in_channels(block), size, size)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        with torch.no_grad():
            y = swapped(x)
        print(f"| {name} | {args.batch} | {saved_bytes(swapped, x) / 1e6:.2f} | "
              f"{(x.numel() + y.numel()) * 4 / 1e6:.2f} |")


def _in_channels(block: torch.nn.Module) -> int:
    return next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


if __name__ == "__main__":
    main()
