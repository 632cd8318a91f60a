from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from reid_search.checkpoint import load_model, read_checkpoint, save_checkpoint
from reid_search.errors import ModelError
from reid_search.model import BACKBONES, build_model, fuse_for_inference
from reid_search.transforms import Preprocess


@pytest.mark.parametrize("last_stride, grid", [(1, (16, 8)), (2, (8, 4))])
def test_resnet50_shapes_and_stride(last_stride: int, grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=10, last_stride=last_stride)
    x = torch.randn(2, 3, 256, 128)
    model.eval()
    with torch.no_grad():
        fmap = model.backbone(x)
        feat = model(x)
    assert fmap.shape == (2, 2048, *grid)
    assert feat.shape == (2, 2048)
    assert torch.isfinite(feat).all()


def test_bnneck_train_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=7)
    x = torch.randn(4, 3, 256, 128)
    model.train()
    logits, feat = model(x)
    assert logits.shape == (4, 7) and feat.shape == (4, 2048)
    # train output is the pre-BN pooled feature; eval output the post-BN one
    with torch.no_grad():
        pre = model.forward_features(x)
    assert torch.allclose(feat, pre, atol=1e-5)
    model.eval()
    with torch.no_grad():
        post = model(x)
        expected = model.bottleneck(model.forward_features(x))
    assert torch.allclose(post, expected, atol=1e-5)
    assert not torch.allclose(post, pre, atol=1e-3)
    # frozen BN bias, bias-free classifier initialised with std 0.001
    assert model.bottleneck.bias.requires_grad is False
    assert model.bottleneck.weight.requires_grad is True
    assert model.classifier.bias is None
    std = model.classifier.weight.std().item()
    assert 0.0007 < std < 0.0013


def test_neck_none_classifies_pooled_feature() -> None:
    model = build_model("resnet18", num_classes=3, last_stride=2, neck="none").eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_features(x))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_runs(name: str) -> None:
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 32))
    assert out.shape == (1, BACKBONES[name][1])
    assert torch.isfinite(out).all()


def test_feature_extractor_without_classifier_refuses_training() -> None:
    model = build_model("resnet18", num_classes=0).train()
    with pytest.raises(ModelError, match="no classifier"):
        model(torch.randn(2, 3, 64, 32))


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ModelError, match="resnet50"):
        build_model("vit_tiny")
    with pytest.raises(ModelError, match="bnneck"):
        build_model("resnet18", neck="bnnek")


def test_pretrained_from_local_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", num_classes=3, pretrained=path)
    assert torch.equal(model.backbone[0].weight, ref.conv1.weight)
    assert torch.equal(model.backbone[7][1].conv2.weight, ref.layer4[1].conv2.weight)


def test_pretrained_wrong_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelError, match="do not fit resnet50"):
        build_model("resnet50", pretrained=path)
    with pytest.raises(ModelError, match="no such file"):
        build_model("resnet18", pretrained=tmp_path / "nope.pth")


def test_imagenet_without_network_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError, match="--pretrained PATH"):
        build_model("resnet18", pretrained="imagenet")


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build_model("resnet18", num_classes=4, last_stride=1)
    pre = Preprocess(128, 64)
    meta = save_checkpoint(tmp_path / "m.pt", model, pre, config={"recipe": "x", "epochs": 3})
    loaded, meta2, cfg = load_model(tmp_path / "m.pt")
    assert meta2 == meta and cfg == {"recipe": "x", "epochs": 3}
    assert meta2.preprocess == pre
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))
    # the classifier does not change the embedding, so not the fingerprint either
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert save_checkpoint(tmp_path / "m2.pt", model, pre).fingerprint == meta.fingerprint
    with torch.no_grad():
        model.bottleneck.weight.add_(1.0)
    assert save_checkpoint(tmp_path / "m3.pt", model, pre).fingerprint != meta.fingerprint


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="reid-search train"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a reid-search checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def _with_running_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so folding them is not a no-op."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fuse_for_inference_folds_every_conv_bn_pair(name: str) -> None:
    model = _with_running_stats(build_model(name, num_classes=7)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    # Every BatchNorm2d sits after a convolution in a ResNet: none may be left.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert not fused.training and (fused.arch, fused.feat_dim) == (model.arch, model.feat_dim)
    # The caller's model is untouched: same mode, same tensors.
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 3, 128, 64)
    with torch.inference_mode():
        want = model.eval()(x)
        got = fused(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_fuse_for_inference_falls_back_on_untraceable_models(caplog: pytest.LogCaptureFixture) -> None:
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # control flow on a value: torch.fx cannot trace it

    model = _with_running_stats(DataDependent())
    with caplog.at_level("WARNING"):
        fused = fuse_for_inference(model)
    assert "running the model unfused" in caplog.text
    assert fused is not model and not fused.training
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model.eval()(x))
