"""Whole networks, forward (eval): torchvision GoogLeNet, the paper's and Inception-v3, swapped or not."""

import copy

import pytest
import torch
import torchvision

import inception_fast as ifast
from inception_fast.models import googlenet_paper

from conftest import BATCHES, DEVICE, DTYPES, SMOKE

PROVIDERS = ["eager_nchw", "eager_channels_last", "fused"] + ([] if SMOKE else ["compile_freezing"])
MODELS = {
    "torchvision_googlenet": lambda: torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True),
    "googlenet_paper": lambda: googlenet_paper(aux_logits=False),
    "torchvision_inception_v3": lambda: torchvision.models.inception_v3(weights=None, aux_logits=False,
                                                                         init_weights=True),
}
INPUT_SIZE = {"torchvision_inception_v3": 299}  # the others take 224


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_network(benchmark, model_name, dtype, batch, provider):
    model = MODELS[model_name]().eval().to(device=DEVICE, dtype=dtype)
    size = 75 if SMOKE else INPUT_SIZE.get(model_name, 224)  # 75: inception_v3's smallest input
    x = torch.randn(batch, 3, size, size, device=DEVICE, dtype=dtype)
    if provider != "eager_nchw":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if provider == "fused":
        model = ifast.swap_inception(copy.deepcopy(model))
    elif provider == "compile_freezing":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        model = torch.compile(model)
    benchmark.group = f"{model_name}-{str(dtype).removeprefix('torch.')}-N{batch}"
    benchmark.extra_info["macs"] = ifast.profile(MODELS[model_name]().eval(), tuple(x.shape)).total_macs

    def forward():
        with torch.no_grad():
            model(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    forward()  # warm-up (and compile) outside the timed rounds
    benchmark.pedantic(forward, rounds=1 if SMOKE else 5, warmup_rounds=0 if SMOKE else 1)
