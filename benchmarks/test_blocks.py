"""Each GoogLeNet block, forward, backward and forward+backward, through every provider."""

import pytest
import torch

import inception_fast as ifast
from inception_fast._extension import cpu_extension

from conftest import BATCHES, DEVICE, DTYPES, SMOKE

BLOCKS = ["5a"] if SMOKE else list(ifast.GOOGLENET_INCEPTION)
PROVIDERS = ["eager_nchw", "eager_channels_last", "fused_reference"]
if DEVICE == "cuda":
    PROVIDERS.append("fused_triton")
elif cpu_extension() is not None:
    PROVIDERS.append("fused_cpu")
if not SMOKE:
    PROVIDERS.append("compile")  # with freezing for inference


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_provider(provider: str, block, batch: int, dtype: torch.dtype, mode: str):
    """The timed callable for one case; anything not timed (compiling, a backward's
    forward) runs here, outside the rounds."""
    train = mode != "forward"
    ref = ifast.ReferenceInception(block.spec).to(device=DEVICE, dtype=dtype).train(train)
    x = torch.randn(batch, block.spec.in_channels, block.size, block.size, device=DEVICE, dtype=dtype)
    grad = torch.randn(batch, block.spec.out_channels, block.size, block.size, device=DEVICE, dtype=dtype)
    channels_last = provider != "eager_nchw"
    if channels_last:  # inputs and grad_output in the layout a channels_last network hands over
        ref = ref.to(memory_format=torch.channels_last)
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    if provider.startswith("fused_"):
        module = ifast.FusedInception.from_module(ref, backend=provider.removeprefix("fused_"))
    elif provider == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = not train
        module = torch.compile(ref)
    else:
        module = ref
    x.requires_grad_(train)

    if mode == "forward":
        def run():
            with torch.no_grad():
                module(x)
            _sync()
    elif mode == "backward":
        y = module(x)

        def run():
            y.backward(grad, retain_graph=True)
            _sync()
    else:
        def run():
            module(x).backward(grad)
            _sync()
    run()  # warm-up (and compile) outside the timed rounds
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_name", BLOCKS)
@pytest.mark.parametrize("mode", ["forward", "backward", "forward_backward"])
def test_block(benchmark, block_name, dtype, batch, provider, mode):
    if provider == "fused_cpu" and dtype not in (torch.float32, torch.float64):
        pytest.skip("the C++ kernel runs float32 and float64")
    block = ifast.GOOGLENET_INCEPTION[block_name]
    fn = make_provider(provider, block, batch, dtype, mode)
    benchmark.group = f"{block_name}-{str(dtype).removeprefix('torch.')}-N{batch}-{mode}"
    forward_macs = block.spec.macs(block.size, block.size, batch).total
    # A backward is two forward-sized GEMM sets (data and weight gradients).
    benchmark.extra_info["macs"] = {"forward": 1, "backward": 2, "forward_backward": 3}[mode] * forward_macs
    benchmark.pedantic(fn, rounds=1 if SMOKE else 10, warmup_rounds=0 if SMOKE else 2)
