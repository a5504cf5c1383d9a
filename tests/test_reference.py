import pytest
import torch

import inception_fast as ifast
from inception_fast.models import GoogLeNetOutputs, googlenet_loss, googlenet_paper


@pytest.mark.parametrize("name", list(ifast.GOOGLENET_INCEPTION))
def test_block_output_shapes(name):
    block = ifast.GOOGLENET_INCEPTION[name]
    y = ifast.ReferenceInception(block.spec)(torch.randn(2, block.spec.in_channels, block.size, block.size))
    assert y.shape == (2, block.spec.out_channels, block.size, block.size)
    assert (y >= 0).all()  # every branch ends in ReLU


def test_batch_norm_reference_matches_torchvision_block_keys():
    from torchvision.models.googlenet import Inception

    theirs = Inception(192, 64, 96, 128, 16, 32, 32)
    # torchvision's "5x5" is 3x3; give ours the same to compare all keys and shapes.
    ours = ifast.ReferenceInception(ifast.InceptionSpec(192, 64, 96, 128, 16, 32, 32, k5=3), batch_norm=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(1, 192, 9, 9)
    torch.testing.assert_close(ours(x), theirs(x))


def test_googlenet_paper_eval_and_train_outputs():
    model = googlenet_paper()
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1000)
    model.train()
    out = model(x)
    assert isinstance(out, GoogLeNetOutputs)
    assert out.logits.shape == out.aux1.shape == out.aux2.shape == (2, 1000)
    target = torch.randint(0, 1000, (2,))
    loss = googlenet_loss(out, target)
    expected = sum(w * torch.nn.functional.cross_entropy(o, target) for w, o in zip((1, 0.3, 0.3), out))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.aux1.fc2.weight.grad is not None


def test_googlenet_paper_rows_follow_the_paper():
    names = [n for n, _ in googlenet_paper(aux_logits=False).named_children()]
    assert names[:3] == ["conv1", "maxpool1", "lrn1"]
    assert names.index("conv2_reduce") < names.index("conv2") < names.index("maxpool2")
    assert [n for n in names if n.startswith("inception")] == [f"inception{k}" for k in ifast.GOOGLENET_INCEPTION]
    assert names[-3:] == ["avgpool", "dropout", "fc"]
    convs = [m for m in googlenet_paper().modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (5, 5)]
    assert len(convs) == 9  # real 5x5 convolutions, one per Inception block
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in googlenet_paper().modules())


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.randn(1, 191, 5, 5), ValueError, "192 channels"),
        (torch.randn(192, 5, 5), ValueError, "4-D"),
        (torch.ones(1, 192, 5, 5, dtype=torch.int64), TypeError, "floating"),
        (torch.randn(1, 192, 0, 5), ValueError, "spatial"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("cls", ["ReferenceInception", "FusedInception"])
def test_bad_inputs_name_the_argument(cls, x, error, words):
    module = getattr(ifast, cls)(ifast.GOOGLENET_INCEPTION["3a"].spec)
    with pytest.raises(error, match=words):
        module(x)


def test_reference_rejects_non_spec():
    with pytest.raises(TypeError, match="spec"):
        ifast.ReferenceInception((192, 64))
