"""The encoder's weight sources, freezing, and the step interface against the fused teacher-forced pass."""

from __future__ import annotations

import pytest
import torch
import torchvision

from captioning.models.captioner import Captioner
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import ImageEncoder, PrecomputedFeatures


def test_encoder_weights_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    encoder = ImageEncoder("resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(encoder.backbone.conv1.weight, source.conv1.weight)
    assert encoder.feature_dim == 512 and encoder(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    backbone_only = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": backbone_only}, tmp_path / "backbone.pt")  # head-less files load too
    ImageEncoder("resnet18", str(tmp_path / "backbone.pt"))


def test_encoder_weight_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        ImageEncoder("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not a weights name for resnet18"):
        ImageEncoder("resnet18", "IMAGENET_BEST")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="does not match the architecture"):
        ImageEncoder("resnet18", str(tmp_path / "r34.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could not read weights file"):
        ImageEncoder("resnet18", str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="model.encoder.name"):
        ImageEncoder("resnet9000")


@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("efficientnet_b0", 1280), ("convnext_tiny", 768)])
def test_other_backbones_lose_their_classifier(name, dim):
    assert ImageEncoder(name).feature_dim == dim


def test_frozen_encoder_has_no_gradients_and_fixed_batchnorm():
    encoder = ImageEncoder("resnet18", trainable=False).train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.backbone.bn1.training
    before = encoder.backbone.bn1.running_mean.clone()
    encoder(torch.randn(4, 3, 32, 32) * 5)
    assert torch.equal(before, encoder.backbone.bn1.running_mean)


def test_grid_pooling_keeps_where_things_are():
    torch.manual_seed(0)
    encoder = ImageEncoder("resnet18", pool="grid", grid_size=2).eval()
    assert encoder.feature_dim == 2048
    blank = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        reference = encoder(blank).view(512, 4)
        for cell, (rows, cols) in enumerate(
            [
                (slice(0, 48), slice(0, 48)),
                (slice(0, 48), slice(80, 128)),
                (slice(80, 128), slice(0, 48)),
                (slice(80, 128), slice(80, 128)),
            ]
        ):
            image = blank.clone()
            image[..., rows, cols] = 3.0  # a bright patch in one corner
            change = (encoder(image).view(512, 4) - reference).abs().sum(0)  # (4,) per grid cell
            assert change.argmax().item() == cell
    with pytest.raises(ValueError, match="model.encoder.pool"):
        ImageEncoder("resnet18", pool="max")
    with pytest.raises(
        ValueError, match="pool=grid needs a classifier of one linear layer .* mobilenet_v3_small's has 2"
    ):
        ImageEncoder("mobilenet_v3_small", pool="grid")  # its hidden 576 -> 1024 layer cannot read 4 cells
    assert ImageEncoder("mobilenet_v3_small", pool="avg").feature_dim == 1024


def test_attention_parts_are_the_grid_cells_and_the_object_slots(tmp_path):
    from omegaconf import OmegaConf

    from captioning.models.attention import feature_parts

    torch.manual_seed(0)
    encoder = ImageEncoder("resnet18", pool="grid", grid_size=2).eval()
    pooled = []
    encoder.backbone.avgpool.register_forward_hook(lambda module, args, output: pooled.append(output))
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 64, 64))  # (2, 2048)
    parts = feature_parts(OmegaConf.create({"pool": "grid", "grid_size": 2}), encoder.feature_dim)
    assert parts.shape == (4, 512)
    for cell in range(4):  # part k: the 512 channels of grid cell k (row-major)
        assert torch.equal(features[:, parts[cell]], pooled[0][:, :, cell // 2, cell % 2])
    head = tmp_path / "head.pth"
    groups = [["count", 3], ["slot0_shape", 2], ["slot0_colour", 3], ["slot1_shape", 2], ["slot1_colour", 3]]
    torch.save({"weight": torch.zeros(13, 8), "bias": torch.zeros(13), "groups": groups}, head)
    slots = feature_parts(OmegaConf.create({"pool": "avg", "label_head": str(head)}), 13)
    assert slots.tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]  # the count is not a part
    with pytest.raises(ValueError, match="gives 13 probabilities, but the features have 12"):
        feature_parts(OmegaConf.create({"label_head": str(head)}), 12)
    with pytest.raises(ValueError, match="global average has none"):
        feature_parts(OmegaConf.create({"pool": "avg"}), 512)
    torch.save({"weight": torch.zeros(4, 8), "bias": torch.zeros(4), "groups": [["count", 2], ["layout", 2]]}, head)
    with pytest.raises(ValueError, match="per object slot .* no slots"):
        feature_parts(OmegaConf.create({"label_head": str(head)}), 4)
    torch.save(
        {
            "weight": torch.zeros(5, 8),
            "bias": torch.zeros(5),
            "groups": [["slot0_shape", 2], ["slot1_shape", 2], ["slot1_size", 1]],
        },
        head,
    )
    with pytest.raises(ValueError, match="same labels in every slot"):
        feature_parts(OmegaConf.create({"label_head": str(head)}), 5)
    (tmp_path / "junk.pth").write_text("not a head")
    with pytest.raises(ValueError, match="not a label head file"):
        feature_parts(OmegaConf.create({"label_head": str(tmp_path / "junk.pth")}), 5)


@pytest.mark.parametrize(
    "cell, image_feed, attention",
    [
        ("lstm", "first", False),
        ("gru", "first", False),
        ("rnn", "first", False),
        ("lstm", "every_step", False),
        ("gru", "every_step", False),
        ("lstm", "every_step", True),
        ("rnn", "first", True),
    ],
)
def test_step_interface_equals_the_fused_teacher_forced_pass(cell, image_feed, attention):
    torch.manual_seed(0)
    model = Captioner(
        PrecomputedFeatures(20),
        RNNDecoder(30, 8, 12, num_layers=2, cell=cell),
        image_feed=image_feed,
        attention_parts=torch.arange(20).view(4, 5) if attention else None,
    ).eval()
    features = torch.randn(3, 20)
    inputs = torch.randint(3, 30, (3, 6))
    inputs[:, 0] = model.bos_id
    fused = torch.log_softmax(model.forward_teacher_forcing(features, inputs), -1)  # (N, T, V)
    state = model.init_state(features)
    for t in range(6):
        log_probs, state = model.step(inputs[:, t], state)
        torch.testing.assert_close(log_probs, fused[:, t], rtol=1e-5, atol=1e-5)
    # reorder_state: rows move with their index, and can be repeated (images -> beams)
    state = model.init_state(features)
    index = torch.tensor([2, 2, 0])
    moved = model.reorder_state(state, index)
    for full, picked in zip(state, moved):
        assert torch.equal(full[:, index], picked)
    assert (model.bos_id, model.eos_id, model.pad_id, model.vocab_size) == (1, 2, 0, 30)

    def zeroed(position):  # the state with one tensor replaced by zeros
        return tuple(torch.zeros_like(s) if i == position % len(state) else s for i, s in enumerate(state))

    rnn_tensors = {"lstm": 2, "gru": 1, "rnn": 1}[cell]
    assert len(state) == rnn_tensors + (image_feed == "every_step") + attention
    if attention:  # the projected parts ride at the end of the state and change every step's output
        assert state[-1].shape == (4, 3, 24)  # keys and values
        assert not torch.allclose(model.step(inputs[:, 0], state)[0], model.step(inputs[:, 0], zeroed(-1))[0])
    if image_feed == "every_step":  # the projected image rides in the state and changes every step's output
        assert state[rnn_tensors].shape == (1, 3, 8)
        other = zeroed(rnn_tensors)
        assert not torch.allclose(model.step(inputs[:, 0], state)[0], model.step(inputs[:, 0], other)[0])
