"""Pictures of what a model computes, with Pillow: detections drawn on an image, heat maps over it,
and one picture per paper of its mechanism, made from `model(..., explain=True)`'s outputs.

Not needed to build, train or run a model (engine/pictures.py calls it for detect.py and train.py).
Coordinates: the explain pictures are drawn on the model's input image (resized, unpadded); a token of
level l covers a square of stride 8 * 2^l input pixels (the deformable models' C3 is stride 8).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from data.transforms import IMAGENET_MEAN, IMAGENET_STD

# distinct, saturated colours (one per class, by its place in the category list)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]
QUERY_COLOURS = [(0, 200, 255), (255, 0, 200), (255, 230, 0)]  # the top queries in the explain pictures
F_LOW, F_HIGH, KEPT, FINE = (40, 140, 255), (255, 150, 0), (40, 220, 90), (255, 0, 200)


def font(size):
    return ImageFont.load_default(size=max(8, int(size)))


def input_image(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The model's input (3, H, W), normalised with mean / std -> a PIL RGB image."""
    rgb = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return Image.fromarray((rgb.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())


def text_colour(fill):
    """Black or white, whichever reads better on `fill` (its luminance)."""
    r, g, b = fill[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_box(draw, box, colour, width, label=None, size=12):
    """A box with a dark rim (visible on light and dark images) and a label on a filled tag."""
    x0, y0, x1, y1 = [float(v) for v in box]
    draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 0, 0), width=width + 2)  # a dark rim both sides
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    if label:
        f = font(size)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=f)
        w, h = right - left + 4, bottom - top + 4
        ty = y0 - h if y0 - h >= 0 else y0  # above the box when there is room
        draw.rectangle([x0, ty, x0 + w, ty + h], fill=colour, outline=(0, 0, 0))
        draw.text((x0 + 2 - left, ty + 2 - top), label, fill=text_colour(colour), font=f)


def draw_detections(image, boxes, labels, scores, names):
    """image: PIL RGB; boxes (M, 4) xyxy pixels; labels (M,) category ids; scores (M,), or None for ground-truth
    boxes; names {id: name}. -> a copy with every box, its class name and score, a colour per class."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    order = {cid: i for i, cid in enumerate(sorted(names))}
    side = min(out.size)
    width, size = max(2, round(side / 150)), max(10, round(side / 28))
    scores = [None] * len(labels) if scores is None else scores.tolist()
    for box, label, score in sorted(zip(boxes.tolist(), labels.tolist(), scores), key=lambda d: d[2] or 0):
        colour = PALETTE[order.get(label, label) % len(PALETTE)]
        name = names.get(label, str(label))
        draw_box(draw, box, colour, width, name if score is None else f"{name} {score:.2f}", size)
    return out


def grey(image):
    """The image in dimmed grey: what coloured marks are drawn over."""
    g = np.asarray(image.convert("L"), dtype=np.float32)
    return Image.fromarray((64 + 0.5 * g).astype(np.uint8)).convert("RGB")


def zoom_for(image, min_side=240):
    """The whole factor that brings the image's shorter side to at least min_side."""
    return max(1, math.ceil(min_side / min(image.size)))


def heat_colours(heat):
    """(h, w) in [0, 1] -> (3, h, w) in [0, 1]: black -> red -> yellow."""
    return torch.stack([(2 * heat).clamp(0, 1), (2 * heat - 1).clamp(0, 1), torch.zeros_like(heat)])


def heat_over(image, heatmap, cell, vmin=None, vmax=None):
    """`heatmap` (h, w), one value per feature cell of side `cell` pixels, upsampled bilinearly,
    cropped to the PIL image and blended over it (scaled to [vmin, vmax], default its own range)."""
    W, H = image.size
    heat = F.interpolate(heatmap.detach().float().cpu()[None, None], scale_factor=cell, mode="bilinear",
                         align_corners=False)[0, 0, :H, :W]
    if heat.shape != (H, W):
        raise ValueError(f"a {tuple(heatmap.shape)} heatmap of {cell}-pixel cells does not cover a {H} x {W} image")
    lo = heat.min() if vmin is None else torch.tensor(float(vmin))
    hi = heat.max() if vmax is None else torch.tensor(float(vmax))
    heat = ((heat - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)
    grey = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)  # (H, W): the map stands out
    base = (0.25 + 0.5 * grey).expand(3, -1, -1)
    blend = base * (1 - 0.75 * heat) + heat_colours(heat) * 0.75 * heat
    return Image.fromarray((blend.permute(1, 2, 0) * 255).round().byte().numpy())


def save_heatmap_png(image, heatmap, path, cell=1, boxes=(), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Write `heatmap` over `image` as a PNG (attention / prior / score maps).

    image (3, H, W): the model's input, normalised with `mean` / `std`, unpadded (crop it first).
    heatmap (h, w): one value per feature cell of side `cell` pixels (the feature stride); it is
    upsampled bilinearly, cropped to H x W, scaled to [0, 1] and blended in red to yellow over the
    image in grey.
    boxes: xyxy boxes in pixels of `image`, outlined in green.
    """
    img = heat_over(input_image(image, mean, std), heatmap, cell)
    draw = ImageDraw.Draw(img)
    for box in boxes:
        draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=2)
    img.save(path)


def panels(rows, title=None, pad=4, min_side=240):
    """rows: [[(PIL image, caption)]] -> one picture, each row a strip of captioned panels. Small
    images are enlarged by a whole factor (nearest neighbour: cells stay sharp) to min_side."""
    cap, line_h = font(11), 14
    strips = []
    for row in rows:
        zoom = max(1, math.ceil(min_side / min(min(im.size) for im, _ in row)))
        row = [(im.resize((im.size[0] * zoom, im.size[1] * zoom), Image.NEAREST), c) for im, c in row]
        n_lines = max(len(c.split("\n")) for _, c in row)
        h = max(im.size[1] for im, _ in row) + n_lines * line_h + pad
        w = sum(im.size[0] for im, _ in row) + pad * (len(row) + 1)
        strip = Image.new("RGB", (w, h), (255, 255, 255))
        draw, x = ImageDraw.Draw(strip), pad
        for im, caption in row:
            draw.multiline_text((x, 1), caption, fill=(0, 0, 0), font=cap, spacing=2)
            strip.paste(im, (x, n_lines * line_h + 2))
            x += im.size[0] + pad
        strips.append(strip)
    head = line_h + 6 if title else 0
    title_w = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font(12)) + 2 * pad if title else 0
    out_w = int(max(title_w, *(s.size[0] for s in strips)))
    out_h = head + sum(s.size[1] + pad for s in strips)
    out = Image.new("RGB", (out_w, out_h), (255, 255, 255))
    if title:
        ImageDraw.Draw(out).text((pad, 2), title, fill=(0, 0, 0), font=font(12))
    y = head
    for s in strips:
        out.paste(s, (0, y))
        y += s.size[1] + pad
    return out


def token_cells(indices, spatial_shapes, base_stride=8):
    """Flat token indices (levels finest first) -> [(level, xyxy square in input pixels)]."""
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    cells = []
    for t in indices:
        lvl = max(i for i in range(len(spatial_shapes)) if starts[i] <= t)
        row, col = divmod(t - starts[lvl], spatial_shapes[lvl][1])
        s = base_stride * 2 ** lvl
        cells.append((lvl, (col * s, row * s, (col + 1) * s - 1, (row + 1) * s - 1)))
    return cells


def level_maps(values, spatial_shapes):
    """(N,) per-token values -> [(H_l, W_l)] one map per level."""
    return [v.view(h, w) for v, (h, w) in zip(values.split([h * w for h, w in spatial_shapes]), spatial_shapes)]


def mark_tokens(image, tokens, spatial_shapes, colour, filled=False, level=None):
    """Outline (or fill, semi-transparent) the cells of the given tokens."""
    out = image.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for lvl, cell in token_cells(tokens, spatial_shapes):
        if level is None or lvl == level:
            draw.rectangle(cell, outline=colour + (255,), fill=colour + (110,) if filled else None)
    return Image.alpha_composite(out, layer).convert("RGB")


# ---------------------------------------------------------------------------------------------
# One picture per paper, from model(image[None], pad_mask, explain=True)
# ---------------------------------------------------------------------------------------------

def explain_smca(image, out, queries, boxes, strides):
    """The Gaussian prior exp(log G) of the last decoder layer, averaged over heads, of each query
    (a row), one panel per scale with the query's scale weight alpha; its box on top."""
    from smca import gaussian_maps  # only SMCA pictures need it
    if out["log_priors"][-1] is None:  # spatial_prior=False: the DETR baseline has nothing to picture
        row = []
        for i, (q, box) in enumerate(zip(queries, boxes)):
            pic = grey(image)
            draw_box(ImageDraw.Draw(pic), box, QUERY_COLOURS[i % 3], 1)
            row.append((pic, f"query {q}: no prior"))
        return panels([row], "The DETR baseline (SMCA with spatial_prior=False): no Gaussian prior to show")
    rows = []
    for i, (q, box) in enumerate(zip(queries, boxes)):
        row = []
        for j, heat in enumerate(gaussian_maps(out, image=0, query=q)):
            pic = heat_over(image, heat, strides[j])
            draw_box(ImageDraw.Draw(pic), box, QUERY_COLOURS[i % 3], 1)
            alpha = out["scale_weights"][-1]
            weight = f", alpha {float(alpha[0, q, j]):.2f}" if alpha is not None else ""
            row.append((pic, f"query {q}: prior at stride {strides[j]}{weight}"))
        rows.append(row)
    if len(strides) == 1:  # single-scale: the queries side by side
        rows = [[row[0] for row in rows]]
    return panels(rows, "SMCA: each query's Gaussian prior on its cross-attention (Eq. 5)")


def explain_sparse_detr(image, out):
    """Per level: the scoring network's token scores with the selected top-rho tokens outlined, and
    the decoder attention map (DAM) the scorer learns from."""
    shapes = out["spatial_shapes"]
    rows = []
    if "token_scores" in out:
        n = int(out["sparse_token_nums"][0])
        selected = out["topk_inds"][0, :n].tolist()
        row = []
        for lvl, scores in enumerate(level_maps(out["token_scores"][0].sigmoid(), shapes)):
            pic = mark_tokens(heat_over(image, scores, 8 * 2 ** lvl, 0, 1), selected, shapes, (0, 255, 255), level=lvl)
            k = sum(1 for lv, _ in token_cells(selected, shapes) if lv == lvl)
            row.append((pic, f"level {lvl} (stride {8 * 2 ** lvl}): scores,\n{k} of {scores.numel()} tokens selected"))
        rows.append(row)
    dam = out["dam"][0]
    rows.append([(heat_over(image, m, 8 * 2 ** lvl, 0, float(dam.max())),
                  f"level {lvl}: DAM (one scale\nfor all levels)")
                 for lvl, m in enumerate(level_maps(dam, shapes))])
    return panels(rows, "Sparse DETR: token scores and the selected tokens (Sec. 3.2); "
                        "the DAM they learn from (Sec. 3.3)")


def explain_lite_detr(image, out, queries, boxes):
    """Which levels are F_L (blue cells) and F_H (orange cells), and the last decoder layer's sampling
    points of each query, coloured by attention weight (black -> red -> yellow: the weight over its
    head's largest), drawn on the image enlarged so that points stay apart."""
    shapes, n_low = out["spatial_shapes"], out["n_low"]
    base, start, row = grey(image), 0, []
    for lvl, (h, w) in enumerate(shapes):
        low = start < n_low
        pic = mark_tokens(base, range(start, start + h * w), shapes, F_LOW if low else F_HIGH, level=lvl)
        row.append((pic, f"level {lvl} (stride {8 * 2 ** lvl}): {'F_L' if low else 'F_H'},\n{h * w} tokens"))
        start += h * w
    rows = [row]
    locs, weights = out["dec_sampling_locations"][0, -1], out["dec_attention_weights"][0, -1]  # (Q, H, L, P, 2)
    zoom = zoom_for(image)
    big = grey(image).resize((image.size[0] * zoom, image.size[1] * zoom), Image.BILINEAR)
    W, H = big.size
    qrow = []
    for i, (q, box) in enumerate(zip(queries, boxes)):
        pic = big.copy()
        draw = ImageDraw.Draw(pic)
        draw_box(draw, [v * zoom for v in box], QUERY_COLOURS[i % 3], 2)
        w = weights[q] / weights[q].amax(dim=(-1, -2), keepdim=True)  # (H, L, P) relative to the head's max
        col = heat_colours(w.flatten()[:, None])[:, :, 0].T  # (H*L*P, 3)
        r = max(2.0, min(W, H) / 100)
        for (x, y), c in sorted(zip(locs[q].reshape(-1, 2).tolist(), col.tolist()), key=lambda pc: sum(pc[1])):
            draw.ellipse([x * W - r, y * H - r, x * W + r, y * H + r], fill=tuple(int(255 * v) for v in c),
                         outline=(255, 255, 255))
        qrow.append((pic, f"query {q}: {locs.shape[1]} heads x {locs.shape[2]} levels x {locs.shape[3]} points,\n"
                          f"colour: attention weight"))
    rows.append(qrow)
    return panels(rows, "Lite DETR: low- (F_L) and high-level (F_H) tokens (Sec. 3.2); the decoder's sampling points")


def mark_token_centres(image, tokens, shapes, colour, zoom):
    """A dot at the centre of each token's cell, its size growing with the level's stride."""
    draw = ImageDraw.Draw(image)
    for lvl, (x0, y0, x1, y1) in token_cells(tokens, shapes):
        cx, cy, r = (x0 + x1 + 1) / 2 * zoom, (y0 + y1 + 1) / 2 * zoom, (1.2 + 0.8 * lvl) * zoom / 2 + 1
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(0, 0, 0))
    return image


def explain_focus_detr(image, out):
    """The foreground score of every token per level; then per encoder layer the tokens it keeps
    (the cascade, green dots, larger for coarser levels) and the fine-grained ones among them that
    run the OESM self-attention (magenta; Focus-DETR's object enhancement self-attention among them)."""
    shapes = out["spatial_shapes"]
    if "fg_logits" not in out:  # foreground_selection=False: the dense DINO base selects no tokens
        return panels([[(grey(image), "every token, every layer")]], "The dense DINO base: no foreground selection")
    fg = out["fg_logits"][0].sigmoid()
    rows = [[(heat_over(image, m, 8 * 2 ** lvl, 0, float(fg.max())), f"level {lvl} (stride {8 * 2 ** lvl}):\n"
              f"foreground score (0 .. {float(fg.max()):.2f})") for lvl, m in enumerate(level_maps(fg, shapes))]]
    zoom = zoom_for(image)
    big = grey(image).resize((image.size[0] * zoom, image.size[1] * zoom), Image.BILINEAR)
    row = []
    for lid, (kept, fine) in enumerate(zip(out["kept_tokens"], out["fine_tokens"])):
        kept, fine = [t for t in kept[0].tolist() if t >= 0], set(t for t in fine[0].tolist() if t >= 0)
        pic = mark_token_centres(big.copy(), [t for t in kept if t not in fine], shapes, KEPT, zoom)
        pic = mark_token_centres(pic, sorted(fine), shapes, FINE, zoom)
        row.append((pic, f"encoder layer {lid}: {len(kept)} kept,\n{len(fine)} of them fine-grained"))
    per_row = math.ceil(len(row) / math.ceil(len(row) / 3))
    rows += [row[i:i + per_row] for i in range(0, len(row), per_row)]
    return panels(rows, "Focus-DETR: foreground scores (Sec. 3.2); per encoder layer, kept (green) and "
                        "fine-grained (magenta) tokens (Sec. 3.3)")


def explain_picture(model_name, image, out, queries, boxes, strides=None):
    """The paper's mechanism for one image: image (3, H, W) the model's (normalised, unpadded) input,
    out its explain outputs (batch of 1), queries the top query indices, boxes their xyxy input pixels."""
    pil = input_image(image)
    if model_name == "smca":
        return explain_smca(pil, out, queries, boxes, strides)
    if model_name == "sparse_detr":
        return explain_sparse_detr(pil, out)
    if model_name == "lite_detr":
        return explain_lite_detr(pil, out, queries, boxes)
    if model_name == "focus_detr":
        return explain_focus_detr(pil, out)
    raise ValueError(f"no explain picture for model {model_name!r}")
