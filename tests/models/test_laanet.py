"""LAA-Net: size, outputs, losses, and official-checkpoint compatibility against an independent forward."""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch
import torch.nn.functional as F

import models
from models.backbones import lukemelas_to_timm
from models.laanet import consistency_loss, heatmap_focal_loss

SPEC_KEYS = Path(__file__).resolve().parents[2] / "docs" / "laanet_state_dict.tsv"


@pytest.fixture(scope="module")
def laanet():
    torch.manual_seed(0)
    return models.build("laanet", static_padding_size=380)


def test_parameter_count_and_feature_channels(laanet):
    assert sum(p.numel() for p in laanet.parameters()) == 27_128_786
    assert sum(p.numel() for p in laanet.backbone.parameters()) == 17_548_616
    assert [laanet.backbone.feature_info[i]["num_chs"] for i in (2, 3, 4)] == [56, 160, 448]


def test_static_padding_only_changes_the_one_stride2_layer(laanet):
    strided = {name: m.fixed_padding for name, m in laanet.named_modules()
               if hasattr(m, "fixed_padding") and m.stride[0] == 2}
    assert strided["backbone.blocks.2.0.conv_dw"] == (2, 2, 2, 2)  # dynamic "same" at 96 px would pad (1, 2)
    assert all(p in ((0, 1, 0, 1), (1, 2, 1, 2)) for n, p in strided.items() if n != "backbone.blocks.2.0.conv_dw")


def test_outputs_and_backward_on_tiny_input(laanet):
    laanet.train()
    images = torch.randn(2, 3, 64, 64)
    out = laanet(images)
    assert out["logit"].shape == (2,)
    assert out["heatmap"].shape == (2, 1, 16, 16) and out["consistency"].shape == (2, 256, 16, 16)
    batch = {"label": torch.tensor([0.0, 1.0]), "heatmap": torch.zeros(2, 1, 16, 16),
             "consistency": torch.rand(2, 1, 16, 16), "anchor": torch.tensor([0, 37])}
    batch["heatmap"][1, 0, 5, 7] = 1.0
    parts = laanet.compute_loss(out, batch, heatmap=10.0, consistency=100.0, cls=1.0)
    assert set(parts) == {"loss", "cls", "heatmap", "consistency"}
    expected = 10 * parts["heatmap"] + 100 * parts["consistency"] + parts["cls"]
    assert torch.allclose(parts["loss"], expected)
    laanet.zero_grad()
    parts["loss"].backward()
    missing = [n for n, p in laanet.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    laanet.zero_grad()


def test_focal_loss_hand_values():
    logits = torch.tensor([[[[0.0, 2.0]]]])  # p = 0.5 and 0.8808
    target = torch.tensor([[[[1.0, 0.5]]]])
    p1, p2 = 0.5, torch.sigmoid(torch.tensor(2.0)).item()
    positive = 0.72 * torch.log(torch.tensor(p1)) * (1 - p1) ** 2
    negative = torch.log(torch.tensor(1 - p2)) * p2 ** 2 * 0.5 ** 4
    assert torch.allclose(heatmap_focal_loss(logits, target), -(positive + negative))
    # All-real batch: no peaks, divided by 1 (not left unnormalised by a different rule).
    only_negative = heatmap_focal_loss(logits, torch.zeros_like(target))
    p = torch.sigmoid(logits)
    assert torch.allclose(only_negative, -(torch.log(1 - p) * p ** 2).sum())


def test_consistency_loss_matches_explicit_formula():
    torch.manual_seed(1)
    features = torch.randn(2, 4, 3, 3)
    target = torch.rand(2, 1, 3, 3)
    anchor = torch.tensor([4, 0])
    expected = 0.0
    for b in range(2):
        flat = features[b].reshape(4, 9)
        similarity = torch.sigmoid(flat[:, anchor[b]] @ flat / 2.0)  # sqrt(4) = 2
        expected += F.binary_cross_entropy(similarity, target[b].reshape(9), reduction="sum")
    assert torch.allclose(consistency_loss(features, target, anchor), expected / 18, atol=1e-6)


# --- official checkpoints ------------------------------------------------------------------------------

def _spec_keys() -> dict[str, tuple[int, ...]]:
    rows = SPEC_KEYS.read_text().splitlines()[1:]
    shapes = {}
    for row in rows:
        key, shape, _ = row.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def _reference_style_checkpoint(seed: int = 3) -> dict[str, torch.Tensor]:
    """A checkpoint laid out like the released LAA-Net weights: lukemelas trunk keys at the top level, the
    decoder, and the Inception block registered twice. Random values, BN statistics included."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(seed)
    trunk = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4", image_size=380)
    state = {k: v for k, v in trunk.state_dict().items() if not k.startswith("_fc.")}
    decoder = models.build("laanet").state_dict()
    state.update({k: v for k, v in decoder.items() if not k.startswith("backbone.")})
    state.update({"inception_block." + k[len("deconv_4.0."):]: v for k, v in decoder.items()
                  if k.startswith("deconv_4.0.")})
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if value.is_floating_point():
            if key.endswith("running_var"):
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            elif key.endswith(("running_mean", "bias")):
                value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    for key in [k for k in state if k.startswith("deconv_4.0.")]:  # keep the twins identical
        state["inception_block." + key[len("deconv_4.0."):]] = state[key]
    return state, trunk


def test_reference_checkpoint_layout_matches_the_spec():
    state, _ = _reference_style_checkpoint()
    spec = _spec_keys()
    assert len(spec) == 803
    assert {k: tuple(v.shape) for k, v in state.items()} == spec


def _reference_forward(state: dict, trunk, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """LAA-Net's eval forward written from the reference code, on the raw checkpoint tensors."""
    endpoints = trunk.extract_endpoints(images)
    x1, x2, x3, x4 = (endpoints[f"reduction_{i}"] for i in (6, 5, 4, 3))

    def bn(x, prefix):
        return F.batch_norm(x, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                            state[prefix + ".weight"], state[prefix + ".bias"], False, 0.0, 1e-5)

    def conv_block(x, prefix, padding):
        return F.relu(bn(F.conv2d(x, state[prefix + ".0.weight"], padding=padding), prefix + ".1"))

    def up(x, prefix):
        x = conv_block(x, prefix + ".0", 1)
        return bn(F.conv_transpose2d(x, state[prefix + ".1.weight"], stride=2, padding=1), prefix + ".2")

    def fuse(x, c):
        return torch.cat([x, (1 - torch.sigmoid(x)) * c], 1)

    def inception(x):
        pw = lambda t: conv_block(t, "inception_block.pw_block", 0)  # noqa: E731 - the shared 1x1
        return torch.cat([pw(x), conv_block(pw(x), "inception_block.conv3_block", 1),
                          conv_block(pw(x), "inception_block.conv5_block", 2),
                          pw(F.max_pool2d(x, 3, 1, 1))], 1)

    x = fuse(conv_block(x1, "deconv_1.0", 1), x2)
    x = fuse(up(x, "deconv_2"), x3)
    x = fuse(up(x, "deconv_3"), x4)
    x = F.relu(bn(F.conv_transpose2d(inception(x), state["deconv_4.1.weight"], stride=2, padding=1), "deconv_4.2"))

    def head(prefix, last):
        h = F.relu(bn(F.conv2d(x, state[prefix + ".0.weight"], state[prefix + ".0.bias"], padding=1), prefix + ".1"))
        return F.conv2d(h, state[f"{prefix}.{last}.weight"], state[f"{prefix}.{last}.bias"])

    pooled = F.relu(bn(F.conv2d(x, state["cls.0.weight"], state["cls.0.bias"], padding=1), "cls.1")).mean((2, 3))
    return {"logit": F.linear(pooled, state["cls.5.weight"], state["cls.5.bias"])[:, 0],
            "heatmap": head("hm", 3), "consistency": head("cstency", 3)}


def test_official_checkpoint_loads_and_reproduces_the_reference(tmp_path, media_dir):
    state, trunk = _reference_style_checkpoint()
    trunk.eval()  # its tensors are the checkpoint's (state_dict shares them)
    path = tmp_path / "laanet_official.pth"
    torch.save({"epoch": 99, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)

    face = cv2.resize(cv2.imread(str(media_dir / "photos/face_recognition/obama.jpg")), (384, 384))
    images = torch.from_numpy(face[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        expected = _reference_forward(state, trunk, images)
        exact = models.load_weights(models.build("laanet", static_padding_size=380), path).eval()(images)
        dynamic = models.load_weights(models.build("laanet"), path).eval()(images)
    for name in ("logit", "heatmap", "consistency"):
        assert torch.allclose(exact[name], expected[name], atol=1e-4, rtol=1e-4), name
    # timm's dynamic padding differs in one layer: outputs move, which is why the option exists.
    assert not torch.allclose(dynamic["heatmap"], expected["heatmap"], atol=1e-4)


@pytest.mark.parametrize("layout", ["advprop", "sbi_checkpoint"])
def test_backbone_weights_in_lukemelas_naming_load(tmp_path, layout):
    # AdvProp ImageNet files (plain lukemelas keys) and SBI's released checkpoints ({'model': {'net.…'}},
    # a 2-class _fc) both give the trunk's weights.
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(5)
    classes = 1000 if layout == "advprop" else 2
    trunk = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4", image_size=380, num_classes=classes)
    path = tmp_path / f"{layout}.pth"
    if layout == "advprop":
        torch.save(trunk.state_dict(), path)
    else:
        torch.save({"model": {f"net.{k}": v for k, v in trunk.state_dict().items()}, "epoch": 99}, path)
    model = models.build("laanet", backbone_weights=str(path))
    expected = lukemelas_to_timm({k: v for k, v in trunk.state_dict().items() if not k.startswith("_fc")},
                                 model.backbone)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_wrong_weights_name_the_file_and_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="(?s)other.pth.*missing"):
        models.load_weights(models.build("laanet"), path)
    with pytest.raises(ValueError, match="unknown model"):
        models.build("laa_net")
    with pytest.raises(ValueError, match="no argument.*dropuot"):
        models.build("laanet", dropuot=0.1)
