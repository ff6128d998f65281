"""Tests of tools/export.py: torch.export of each model for a fixed size, outputs equal to eager."""
import pytest
import torch

import detect
import focus_detr
import lite_detr
import smca
import sparse_detr
from test_models import _detectron2_name
from tests.helpers import _official_file, _tiny_checkpoint, tiny_focus, tiny_lite, tiny_smca, tiny_sparse
from tools import export


@pytest.mark.parametrize("module,cfg", [
    (smca, tiny_smca()),
    (lite_detr, tiny_lite(enc_layers=2, num_blocks=1)),  # H3L1-(1+1)x1: both kinds of layer
    (sparse_detr, tiny_sparse()),  # the sparse encoder: S = max n_b, a count read from the mask
    (sparse_detr, tiny_sparse(sparse_encoder=False, use_enc_aux_loss=False)),  # the dense base
    # the cascade's counts k_l, J_l read from the mask (two layers keep two counts; six export 2.3x slower); Up() of
    # each valid region
    (focus_detr, tiny_focus(enc_layers=2, cascade_ratios=(1.0, 0.6))),
    (focus_detr, tiny_focus(foreground_selection=False)),  # the dense DINO base
], ids=["smca", "lite_detr", "sparse_detr", "sparse_detr dense base", "focus_detr", "focus_detr dense base"])
def test_export_program_computes_what_the_model_does(module, cfg):
    """The program equals eager on another input, also with part of the image marked as padding (the counts read
    from the mask are computed when the program runs, not frozen at the export input's)."""
    torch.manual_seed(0)
    model = module.build(cfg)[0].eval()
    program, diff = export.export(model, (64, 96))
    assert diff <= 1e-4
    images, pad_mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)  # another input
    padded = pad_mask.clone()
    padded[:, 40:], padded[:, :, 72:] = True, True
    run = program.module()
    for mask in (pad_mask, padded):
        with torch.no_grad():
            eager = model(images, mask)
            logits, boxes = run(images, mask)
        torch.testing.assert_close(logits, eager["pred_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(boxes, eager["pred_boxes"], atol=1e-5, rtol=0)


def test_export_says_why_a_model_does_not_export():
    class SizedByValue(torch.nn.Module):  # a tensor sized by a value read from the input, with no bounds
        def forward(self, images, pad_mask):
            n = int((~pad_mask).sum())
            return {"pred_logits": images.flatten()[:n].view(1, -1, 1), "pred_boxes": images.new_zeros(1, n, 4)}
    with pytest.raises(ValueError, match="SizedByValue does not export: torch.export said: .*data-dependent"):
        export.export(SizedByValue(), (8, 8))


def test_export_command_writes_a_loadable_program_and_never_overwrites(tiny_shapes, tmp_path):
    ckpt = tmp_path / "smca.pth"
    _tiny_checkpoint(ckpt, tiny_shapes, "smca")
    out = export.main(["--checkpoint", str(ckpt), "--size", "64", "96", "--out", str(tmp_path / "smca.pt2")])
    program = torch.export.load(out).module()
    images, pad_mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    logits, boxes = program(images, pad_mask)
    model = detect.load_detector(str(ckpt)).model.eval()
    with torch.no_grad():
        eager = model(images, pad_mask)
    assert logits.shape == eager["pred_logits"].shape and logits.shape[1] == model.cfg.num_queries
    assert torch.allclose(logits, eager["pred_logits"], atol=1e-5) and torch.allclose(boxes, eager["pred_boxes"],
                                                                                       atol=1e-5)
    with pytest.raises(ValueError, match="exists; nothing is overwritten"):
        export.main(["--checkpoint", str(ckpt), "--size", "64", "96", "--out", out])


def _smca_key(key):
    return f"backbone.0.body.{key}"


@pytest.mark.parametrize("model_name,fixture,backbone_key,schedule", [
    ("smca", "smca_single_scale.pt", _smca_key, None),  # saved with an argparse Namespace as its "args"
    ("focus_detr", "focus_detr_r50_12ep_small.pt", _detectron2_name, None),  # detrex's: no "args" at all
    ("focus_detr", "focus_detr_r50_12ep_small.pt", _detectron2_name, "36ep"),
], ids=["smca", "focus_detr", "focus_detr-36ep"])
def test_export_default_size_of_the_authors_weights_is_cocos(tmp_path, model_name, fixture, backbone_key, schedule):
    """The authors' files are COCO models: 800 x 1333 by default, as detect.load_detector found it (the size only:
    a ResNet-50 exports slowly at that size); --official-schedule reaches Focus-DETR's Config."""
    import argparse
    path = _official_file(tmp_path, fixture, backbone_key,
                          {"args": argparse.Namespace(smooth=8)} if model_name == "smca" else None)[1]
    out = str(tmp_path / "m.pt2")
    stated = ["--official-schedule", schedule] if schedule else []
    name, model, size = export.load_model(export.parse_args(["--checkpoint", path, *stated, "--out", out]))
    assert (name, size) == (model_name, (800, 1333)) and not model.training
    if name == "focus_detr":
        assert model.cfg.pos_temperature == (20.0 if schedule == "36ep" else 10000.0)
    else:
        with pytest.raises(ValueError, match="only the authors' Focus-DETR files take a schedule"):
            export.load_model(export.parse_args(["--checkpoint", path, "--official-schedule", "36ep", "--out", out]))


def test_export_default_size_of_our_checkpoints_is_their_evaluation_size(tiny_shapes, tmp_path):
    ckpt = tmp_path / "smca.pth"  # trained at the shapes sizes (its args: data, scales "shapes")
    _tiny_checkpoint(ckpt, tiny_shapes, "smca")
    out = str(tmp_path / "m.pt2")
    assert export.load_model(export.parse_args(["--checkpoint", str(ckpt), "--out", out]))[2] == (160, 160)
    with pytest.raises(ValueError, match="--official-schedule goes with --checkpoint"):
        export.load_model(export.parse_args(["--model", "smca", "--official-schedule", "12ep", "--out", out]))
