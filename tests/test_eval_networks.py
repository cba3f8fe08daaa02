"""FID Inception-v3 and FVD I3D built with random weights: parameter layout of the published files, forward
shapes, preprocessing, resize conventions, and loading weights from local files (checksums, error messages)."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from vwm.eval import i3d as i3d_mod
from vwm.eval import inception as inc
from vwm.eval.resize import resize_images
from vwm.eval.weights import I3D, INCEPTION, FeatureWeightsError, load_into, verify_file


def test_inception_has_the_parameter_layout_of_the_published_fid_weights():
    # pt_inception-2015-12-05-6726825d.pth was written for torchvision's Inception3 without its auxiliary head
    # and with 1008 classes (pytorch-fid loads it into exactly that module, strictly).
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    ours = inc.FIDInceptionV3()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours.Mixed_7c.branch3x3dbl_3b.bn.eps == 1e-3


def test_inception_forward_gives_2048_features_per_frame():
    torch.manual_seed(0)
    net = inc.FIDInceptionV3().eval()
    frames = torch.randint(0, 256, (2, 3, 72, 128), dtype=torch.uint8)
    with torch.no_grad():
        x = inc.preprocess(frames)
        assert x.shape == (2, 3, 299, 299) and x.min() >= -1.0 and x.max() <= 127 / 128
        out = net(x)
    assert out.shape == (2, inc.FEATURE_DIM) and torch.isfinite(out).all()
    assert (out >= 0).all()  # the mean of ReLU outputs


def test_inception_preprocessing_value_ranges():
    grey = torch.full((1, 3, 10, 10), 128, dtype=torch.uint8)
    assert inc.preprocess(grey, "torchmetrics").abs().max() == 0  # (x - 128) / 128
    white, black = torch.full_like(grey, 255), torch.zeros_like(grey)
    assert torch.allclose(inc.preprocess(white, "pytorch_fid"), torch.ones(1, 3, 299, 299))  # 2 x / 255 - 1
    assert torch.allclose(inc.preprocess(black, "pytorch_fid"), -torch.ones(1, 3, 299, 299))
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        inc.preprocess(grey.float())
    with pytest.raises(ValueError, match="allowed: torchmetrics, pytorch_fid"):
        inc.preprocess(grey, "clean")


def test_tf1_resize_samples_at_index_times_scale_without_half_pixel_offset():
    x = torch.tensor([[[[0.0, 10.0, 20.0, 30.0]]]])
    assert resize_images(x, (1, 2), "tf1").flatten().tolist() == [0.0, 20.0]  # sources 0 and 2
    y = torch.tensor([[[[0.0, 10.0]]]])
    assert resize_images(y, (1, 4), "tf1").flatten().tolist() == [0.0, 5.0, 10.0, 10.0]  # 0, .5, 1, 1.5 (edge)
    z = torch.rand(1, 3, 7, 9)
    assert torch.equal(resize_images(z, (5, 4), "bilinear"),
                       F.interpolate(z, size=(5, 4), mode="bilinear", align_corners=False))


I3D_KEYS = {  # names and shapes of the PyTorch I3D port's state dict (i3d_pretrained_400.pt)
    "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
    "Conv3d_1a_7x7.bn.running_var": (64,),
    "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_4f.b3b.bn.weight": (128,),
    "Mixed_5c.b2b.conv3d.weight": (128, 48, 3, 3, 3),
    "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}


def test_i3d_has_the_parameter_layout_of_the_pytorch_port():
    state = {k: tuple(v.shape) for k, v in i3d_mod.InceptionI3d().state_dict().items()}
    for key, shape in I3D_KEYS.items():
        assert state.get(key) == shape, key
    assert not any(k.startswith("logits.bn") or k == "Conv3d_1a_7x7.conv3d.bias" for k in state)
    modules = {k.split(".")[0] for k in state}
    assert sorted(m for m in modules if m.startswith("Mixed")) == sorted(i3d_mod._MIXED)


def test_same_padding_matches_tensorflow():
    # TF SAME: total = max((ceil(n / s) - 1) * s + k - n, 0), the smaller half in front
    for n, k, s in [(224, 7, 2), (25, 7, 2), (13, 3, 2), (7, 2, 2), (56, 3, 1), (4, 2, 2), (5, 3, 2)]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        assert i3d_mod.same_padding(n, k, s) == (total // 2, total - total // 2)


def test_i3d_forward_gives_400_logits_per_clip():
    torch.manual_seed(0)
    net = i3d_mod.InceptionI3d().eval()
    clips = torch.randint(0, 256, (1, 9, 3, 36, 64), dtype=torch.uint8)
    with torch.no_grad():
        x = i3d_mod.preprocess(clips)
        assert x.shape == (1, 3, 9, 224, 224) and x.min() >= -1 and x.max() <= 1
        out = net(x)
    assert out.shape == (1, i3d_mod.FEATURE_DIM) and torch.isfinite(out).all()
    assert [i3d_mod.output_steps(t) for t in (9, 16, 25)] == [1, 1, 3]
    with pytest.raises(ValueError, match="T >= 9"):
        net(torch.zeros(1, 3, 8, 224, 224))


def test_weights_load_from_a_local_file_strictly(tmp_path):
    torch.manual_seed(1)
    source = i3d_mod.InceptionI3d()
    path = tmp_path / "i3d_random.pt"
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)  # an old-style file without batch-norm step counters
    target = i3d_mod.InceptionI3d()
    digest = verify_file(str(path), I3D)  # no published checksum: only its SHA-256 is returned
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    load_into(target, str(path), I3D)
    assert all(torch.equal(source.state_dict()[k], v) for k, v in target.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    state.pop("logits.conv3d.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(FeatureWeightsError, match=r"does not hold I3D .*missing 1: logits.conv3d.bias; "
                                                  r"unexpected 1: extra.weight"):
        load_into(target, str(tmp_path / "bad.pt"), I3D)


def test_checksum_mismatch_and_missing_file_name_the_file_and_where_to_get_it(tmp_path, caplog):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"fc.bias": torch.zeros(1008)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FeatureWeightsError) as err:
        verify_file(str(path), INCEPTION)
    message = str(err.value)
    assert str(path) in message and f"SHA-256 {digest} does not start with 6726825d" in message
    assert "--inception" in message and "github.com/mseitzer/pytorch-fid/releases" in message
    assert verify_file(str(path), INCEPTION, verify=False) == digest  # benchmarks: warn and go on
    assert "checksum verification is off" in caplog.text
    assert verify_file(str(path), INCEPTION, expected_sha256=digest[:12]) == digest  # a pinned file
    with pytest.raises(FeatureWeightsError, match=r"--i3d='/nonexistent/i3d.pt': no such file; .*cannot be "
                                                  r"downloaded here: get i3d_pretrained_400.pt from"):
        verify_file("/nonexistent/i3d.pt", I3D)
    with pytest.raises(FeatureWeightsError, match="pass --inception PATH"):
        verify_file(None, INCEPTION)
