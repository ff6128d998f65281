"""Tests of tools/export.py: torch.export of each model for a fixed size, outputs equal to eager."""
import pytest
import torch

import detect
import focus_detr
import lite_detr
import smca
import sparse_detr
from tests.helpers import _tiny_checkpoint, tiny_focus, tiny_lite, tiny_smca, tiny_sparse
from tools import export


@pytest.mark.parametrize("module,cfg", [
    (smca, tiny_smca()),
    (lite_detr, tiny_lite(enc_layers=2, num_blocks=1)),  # H3L1-(1+1)x1: both kinds of layer
    (sparse_detr, tiny_sparse()),  # the sparse encoder: S = max n_b, a count read from the mask
    (sparse_detr, tiny_sparse(sparse_encoder=False, use_enc_aux_loss=False)),  # the dense base
    (focus_detr, tiny_focus()),  # the cascade's counts k_l, J_l read from the mask; Up() of each valid region
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
    for mask in (pad_mask, padded):
        with torch.no_grad():
            eager = model(images, mask)
            logits, boxes = program.module()(images, mask)
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
