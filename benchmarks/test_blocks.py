"""Each GoogLeNet block, forward and forward+backward, through every provider."""

import pytest
import torch

import inception_fast as ifast
from inception_fast._extension import cpu_extension

from conftest import BATCHES, SMOKE

BLOCKS = ["5a"] if SMOKE else list(ifast.GOOGLENET_INCEPTION)
PROVIDERS = ["eager_nchw", "eager_channels_last", "fused_reference"] + (["fused_cpu"] if cpu_extension() else [])
if not SMOKE:
    PROVIDERS.append("compile_freezing")


def make_provider(provider: str, block, batch: int, train: bool):
    ref = ifast.ReferenceInception(block.spec).train(train)
    x = torch.randn(batch, block.spec.in_channels, block.size, block.size, requires_grad=train)
    if provider == "eager_nchw":
        module = ref
    elif provider == "eager_channels_last":
        module, x = ref.to(memory_format=torch.channels_last), x.detach().contiguous(memory_format=torch.channels_last)
    elif provider.startswith("fused_"):
        module = ifast.FusedInception.from_module(ref, backend=provider.removeprefix("fused_"))
        x = x.detach().contiguous(memory_format=torch.channels_last)
    else:  # compile_freezing
        import torch._inductor.config as inductor_config

        inductor_config.freezing = not train
        module = torch.compile(ref.to(memory_format=torch.channels_last))
        x = x.detach().contiguous(memory_format=torch.channels_last)
    x.requires_grad_(train)
    if not train:
        def forward():
            with torch.no_grad():
                return module(x)
        return forward
    grad = torch.randn(batch, block.spec.out_channels, block.size, block.size)

    def forward_backward():
        module(x).backward(grad)
    return forward_backward


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("block_name", BLOCKS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_block(benchmark, block_name, batch, provider, mode):
    block = ifast.GOOGLENET_INCEPTION[block_name]
    fn = make_provider(provider, block, batch, train=mode == "forward_backward")
    benchmark.group = f"{block_name}-N{batch}-{mode}"
    benchmark.extra_info["macs"] = block.spec.macs(block.size, block.size, batch).total
    fn()  # warm-up (and compile) outside the timed rounds
    benchmark.pedantic(fn, rounds=1 if SMOKE else 10, warmup_rounds=0 if SMOKE else 2)
