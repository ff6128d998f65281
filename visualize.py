"""Pictures of what a model computes, with Pillow: a heat map (attention, prior, token scores) over
the image it was computed on. Not needed to build, train or run a model.
"""
import torch
import torch.nn.functional as F

from data.transforms import IMAGENET_MEAN, IMAGENET_STD


def save_heatmap_png(image, heatmap, path, cell=1, boxes=(), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Write `heatmap` over `image` as a PNG with Pillow (attention / prior / sampling maps).

    image (3, H, W): the model's input, normalised with `mean` / `std`, unpadded (crop it first).
    heatmap (h, w): one value per feature cell of side `cell` pixels (the feature stride); it is
    upsampled bilinearly, cropped to H x W, scaled to [0, 1] and blended in red.
    boxes: xyxy boxes in pixels of `image`, outlined in green.
    """
    from PIL import Image, ImageDraw  # only this function needs Pillow

    _, H, W = image.shape
    rgb = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    heat = F.interpolate(heatmap.detach().float().cpu()[None, None], scale_factor=cell, mode="bilinear",
                         align_corners=False)[0, 0, :H, :W]
    if heat.shape != (H, W):
        raise ValueError(f"a {tuple(heatmap.shape)} heatmap of {cell}-pixel cells does not cover a {H} x {W} image")
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    red = torch.stack([torch.ones_like(heat), torch.zeros_like(heat), torch.zeros_like(heat)])
    blend = rgb.clamp(0, 1) * (1 - 0.6 * heat) + red * 0.6 * heat  # (3, H, W)
    img = Image.fromarray((blend.permute(1, 2, 0) * 255).round().byte().numpy())
    draw = ImageDraw.Draw(img)
    for box in boxes:
        draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=2)
    img.save(path)
