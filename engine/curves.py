"""A training run's curves, with Pillow: its loss terms and AP against the optimizer step, read from the
log.jsonl train.py writes in its --output-dir. The picture to look at to see whether a run learns.

    python -m engine.curves runs/smca                  # writes runs/smca/curves.png (refuses to overwrite)
    python -m engine.curves runs/smca --out smca.png
    python -m engine.curves RECORDS/smca/base/seed-0.jsonl.gz    # a run's record file (tools/experiments.py)

Top panel, on a log scale: the total loss (black; in grey behind it, its spread over the steps of each pixel
column) and the main loss terms, unweighted as logged (loss_ce, loss_bbox, loss_giou and any other loss_* without
an auxiliary suffix _<i>, _enc, _dn or _backbone: loss_dam, loss_select, ...), each a running mean over 1% of
the steps; the base learning rate (lr_base) as a thin dashed line on the right-hand axis. Bottom panel: AP and
AP50 (%) on the val split at each evaluation, against the optimizer steps trained by then. The legends give each
curve's last value. A resumed run that redid an epoch logs its steps twice: the later record of a step wins.
"""
import argparse
import gzip
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from engine.runtime import run_cli
from engine.visualize import font

SIZE = (1000, 700)
LOSS_BOX = (72, 66, 790, 400)  # the panels' plot areas (left, top, right, bottom) in pixels
AP_BOX = (72, 466, 790, 630)
LEGEND_X = 842
BLACK, GRID, RAW, LR = (0, 0, 0), (232, 232, 232), (212, 212, 212), (120, 120, 120)
TERM_COLOURS = {"loss": BLACK, "loss_ce": (230, 25, 75), "loss_bbox": (0, 130, 200), "loss_giou": (60, 170, 75)}
MORE_COLOURS = [(245, 130, 48), (145, 30, 180), (0, 128, 128), (240, 50, 230), (170, 110, 40), (128, 128, 0)]
AP_COLOURS = {"AP": (0, 90, 200), "AP50": (240, 120, 0)}
AUX = re.compile(r"_(\d+|enc|dn|backbone)(_|$)")  # an auxiliary term's suffix: loss_ce_0, loss_bbox_enc, ...


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------

def log_path(source):
    """A run folder, its log.jsonl or a record file (.jsonl.gz) -> the file to read."""
    if os.path.isdir(source):
        path = os.path.join(source, "log.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{source} has no log.jsonl: pass the --output-dir of a train.py run")
        return path
    if not os.path.isfile(source):
        raise ValueError(f"{source} does not exist: pass a run folder, its log.jsonl or a .jsonl.gz record")
    return source


def read_records(path):
    """The JSON records of a log, in order. A last line cut short (a run still writing) is left out."""
    try:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            lines = [line for line in f if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, cut short, not text
        raise ValueError(f"{path} cannot be read as a train.py log ({type(e).__name__}: {e})") from e
    if not lines:
        raise ValueError(f"{path} is empty: the run has logged nothing yet")
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is not JSON ({e})") from e
    return records


def main_terms(keys):
    """The loss terms drawn: the total `loss` first, then each loss_* without an auxiliary suffix, the three
    matching terms first."""
    terms = [k for k in keys if k.startswith("loss_") and not AUX.search(k[len("loss"):])]
    first = [k for k in ("loss_ce", "loss_bbox", "loss_giou") if k in terms]
    return ["loss"] * ("loss" in keys) + first + sorted(set(terms) - set(first))


def running_mean(values, window):
    """The mean of the finite values among the `window` around each (centred, shorter at the ends); NaN where
    there is none."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    i = np.arange(len(values))
    lo, hi = np.clip(i - window // 2, 0, len(values)), np.clip(i - window // 2 + window, 0, len(values))
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


@dataclass
class Run:
    name: str  # the run folder (or record file) as given
    model: str
    steps: np.ndarray  # (T,) the optimizer step of each train record, sorted, each once
    epochs: int  # how many epochs the train records cover
    window: int  # the running mean's window, in steps
    raw: dict  # term -> (T,) its logged values (NaN where a record has none)
    smooth: dict  # term -> (T,) their running mean
    lr: np.ndarray  # (T,) lr_base (NaN where not logged)
    evals: list  # [(steps trained, AP %, AP50 %)] by steps


def load_run(source):
    """A run folder, its log.jsonl or a .jsonl.gz record -> Run: its train records by step (the later of a
    repeated step), the smoothed main loss terms, lr_base and the evaluations."""
    source = str(source)
    path = log_path(source)
    records = read_records(path)
    train, evals, model, last_step = {}, {}, "model unknown", -1
    for rec in records:
        kind = rec.get("type")
        if kind == "start":
            model = str(rec.get("args", {}).get("model", model))
        elif kind == "train" and "step" in rec:
            train[int(rec["step"])] = rec
            last_step = int(rec["step"])
        elif kind == "eval" and "AP" in rec:
            steps = int(rec["steps"]) if rec.get("steps") is not None else last_step + 1  # old logs have no steps
            evals[steps] = (steps, 100 * rec["AP"], 100 * rec.get("AP50", float("nan")))
    if not train:
        raise ValueError(f"{path} has no train records ({len(records)} records, none of type 'train'): "
                         "nothing to draw before the first optimizer step")
    steps = sorted(train)
    rows = [train[s] for s in steps]

    def column(key):
        return np.array([float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan for r in rows])

    window = max(1, round(0.01 * len(steps)))
    raw = {k: column(k) for k in main_terms({k for r in rows for k in r})}
    name = source[:-len(".jsonl.gz")] if source.endswith(".jsonl.gz") else os.path.dirname(path) or "."
    return Run(name=os.path.normpath(name), model=model, steps=np.array(steps, dtype=float),
               epochs=len({r.get("epoch") for r in rows}), window=window, raw=raw,
               smooth={k: running_mean(v, window) for k, v in raw.items()}, lr=column("lr_base"),
               evals=[evals[s] for s in sorted(evals)])


# ---------------------------------------------------------------------------------------------
# Axes: data -> pixels, ticks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Axes:
    box: tuple  # the plot area (left, top, right, bottom) in pixels
    x: tuple  # the data range shown, left to right
    y: tuple  # bottom to top
    log_y: bool = False

    def xy(self, x, y):
        """Data (step, value) -> pixel (px, py); arrays too. On a log axis a value <= 0 maps to the bottom."""
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x, self.y
        if self.log_y:
            y, y0, y1 = np.log10(np.maximum(y, y0)), math.log10(y0), math.log10(y1)
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)


def nice_ticks(lo, hi, n=6, min_step=0.0):
    """Ticks 1, 2 or 5 x 10^k apart (at least min_step), about n of them, inside [lo, hi]."""
    raw = max((hi - lo) / n, min_step)
    unit = 10.0 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw * 0.999)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def log_ticks(lo, hi):
    """Ticks on a log axis inside [lo, hi]: 1, 2, 5 x 10^k; every decade only when those are many, 1..9 x 10^k
    when they are few."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 2, 5), (1,), range(1, 10)):
        ticks = [float(f"{m}e{k}") for k in decades for m in mantissas if lo <= float(f"{m}e{k}") <= hi]
        if (mantissas == (1, 2, 5) and 3 <= len(ticks) <= 13) or (mantissas == (1,) and len(ticks) >= 3):
            return ticks
    return ticks


def step_text(v):
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e4 else f"{v:g}"


def sci_text(v):
    """1e-4 -> '1e-4', 2.5e-5 -> '2.5e-5', 0 -> '0'."""
    if v == 0:
        return "0"
    e = math.floor(math.log10(abs(v)) + 1e-9)
    return f"{round(v / 10 ** e, 2):g}e{e}"


def layout(run):
    """The two panels' axes: the losses (log y, over the smoothed curves' range) and the learning rate on the same
    box (linear, from 0), the AP panel (0 to the best AP50 rounded up to 10)."""
    x_max = max([run.steps[-1] + 1] + [s for s, _, _ in run.evals])
    values = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in run.smooth.values()] + [np.ones(0)])
    lo, hi = (values.min(), values.max()) if len(values) else (0.1, 10.0)
    lo, hi = (lo / 2, hi * 2) if hi / lo < 4 else (lo / 1.15, hi * 1.15)  # a flat curve: some room around it
    lr = run.lr[np.isfinite(run.lr)]
    lr_max = lr.max() * 1.1 if len(lr) and lr.max() > 0 else 1.0
    best = max([10.0] + [v for e in run.evals for v in e[1:] if math.isfinite(v)])
    ap_max = min(100.0, math.ceil((best + 3) / 10) * 10)
    return {"loss": Axes(LOSS_BOX, (0.0, float(x_max)), (float(lo), float(hi)), log_y=True),
            "lr": Axes(LOSS_BOX, (0.0, float(x_max)), (0.0, float(lr_max))),
            "ap": Axes(AP_BOX, (0.0, float(x_max)), (0.0, ap_max))}


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def clip_y(axes, py):
    return np.clip(py, axes.box[1], axes.box[3])


def draw_frame(draw, axes, y_ticks, y_text, x_labels):
    """The plot area's grid, frame and ticks: y ticks on the left, x ticks (optimizer steps) below."""
    left, top, right, bottom = axes.box
    small = font(11)
    for v in nice_ticks(*axes.x, n=8, min_step=1):  # whole steps
        px, _ = axes.xy(v, axes.y[1])
        draw.line([(px, top), (px, bottom)], fill=GRID)
        draw.line([(px, bottom), (px, bottom + 4)], fill=BLACK)
        if x_labels:
            text = step_text(v)
            draw.text((px - draw.textlength(text, font=small) / 2, bottom + 6), text, fill=BLACK, font=small)
    for v in y_ticks:
        _, py = axes.xy(axes.x[0], v)
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.line([(left - 4, py), (left, py)], fill=BLACK)
        text = y_text(v)
        draw.text((left - 7 - draw.textlength(text, font=small), py - 6), text, fill=BLACK, font=small)
    draw.rectangle(axes.box, outline=BLACK)


def draw_spread(draw, axes, steps, values, fill):
    """Each pixel column's lowest to highest value: a curve's noise, however many steps share a column."""
    ok = np.isfinite(values)
    px, py = axes.xy(steps[ok], values[ok])
    if not len(px):
        return
    cols = np.round(px).astype(int)
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    py = clip_y(axes, py)
    for c, y0, y1 in zip(cols[starts], np.minimum.reduceat(py, starts), np.maximum.reduceat(py, starts)):
        draw.line([(c, y0), (c, y1)], fill=fill)


def draw_curve(draw, axes, steps, values, fill, width=2):
    """A polyline through the finite values (at most a few points per pixel column), kept inside the box."""
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    if len(steps) > 3 * (axes.box[2] - axes.box[0]):
        keep = np.unique(np.linspace(0, len(steps) - 1, 3 * (axes.box[2] - axes.box[0])).round().astype(int))
        steps, values = steps[keep], values[keep]
    px, py = axes.xy(steps, values)
    points = list(zip(px.tolist(), clip_y(axes, py).tolist()))
    if len(points) == 1:
        x, y = points[0]
        draw.ellipse([x - width, y - width, x + width, y + width], fill=fill)
    elif points:
        draw.line(points, fill=fill, width=width, joint="curve")


def draw_dashed(draw, p0, p1, fill, dash=6, gap=4):
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    for a in np.arange(0.0, length, dash + gap):
        b = min(a + dash, length)
        draw.line([(x0 + (x1 - x0) * a / length, y0 + (y1 - y0) * a / length),
                   (x0 + (x1 - x0) * b / length, y0 + (y1 - y0) * b / length)], fill=fill)


def draw_lr(draw, axes, steps, lr):
    """lr_base as a thin dashed step line (a solid one when it changes at more than 100 steps) and its axis on the
    right of the box."""
    ok = np.isfinite(lr)
    steps, lr = steps[ok], lr[ok]
    if not len(lr):
        return
    changes = np.flatnonzero(lr[1:] != lr[:-1]) + 1
    if len(changes) > 100:
        draw_curve(draw, axes, steps, lr, LR, width=1)
    else:
        ends = list(changes) + [len(lr)]
        starts = [0] + list(changes)
        for i, (a, b) in enumerate(zip(starts, ends)):
            x_end = steps[b] if b < len(lr) else axes.x[1]
            draw_dashed(draw, axes.xy(steps[a], lr[a]), axes.xy(x_end, lr[a]), LR)
            if b < len(lr):
                draw_dashed(draw, axes.xy(x_end, lr[a]), axes.xy(x_end, lr[b]), LR)
    right, small = axes.box[2], font(11)
    for v in nice_ticks(0.0, axes.y[1], n=4):
        _, py = axes.xy(axes.x[0], v)
        draw.line([(right, py), (right + 4, py)], fill=LR)
        draw.text((right + 7, py - 6), sci_text(v), fill=LR, font=small)


def draw_legend(draw, top, entries):
    """entries: [(text, colour, dashed)], one a line from `top`, right of the panels."""
    f = font(12)
    for i, (text, colour, dashed) in enumerate(entries):
        y = top + 18 * i
        if dashed:
            draw_dashed(draw, (LEGEND_X, y + 7), (LEGEND_X + 20, y + 7), colour, dash=5, gap=3)
        else:
            draw.line([(LEGEND_X, y + 7), (LEGEND_X + 20, y + 7)], fill=colour, width=3)
        draw.text((LEGEND_X + 26, y), text, fill=BLACK, font=f)


def last_finite(values):
    ok = np.flatnonzero(np.isfinite(values))
    return values[ok[-1]] if len(ok) else float("nan")


def draw_curves(source):
    """A run folder, its log.jsonl or a .jsonl.gz record -> the picture of its losses and AP (PIL RGB, SIZE)."""
    run = load_run(source)
    axes = layout(run)
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    text = font(12)

    # the title: the run and its model, what the log covers
    draw.text((16, 8), f"{run.name}   ({run.model})", fill=BLACK, font=font(17))
    summary = f"{int(run.steps[-1]) + 1} optimizer steps, {run.epochs} epoch{'s' * (run.epochs != 1)}"
    if run.evals:
        steps, ap, ap50 = run.evals[-1]
        summary += f"; last evaluation at step {steps}: AP {ap:.1f}, AP50 {ap50:.1f}"
    draw.text((16, 30), summary, fill=(80, 80, 80), font=text)

    # the losses and the learning rate
    loss = axes["loss"]
    draw.text((loss.box[0], loss.box[1] - 16), f"loss terms (log scale), running mean over {run.window} step"
              f"{'s' * (run.window != 1)}; grey: the total loss's spread", fill=BLACK, font=text)
    if np.isfinite(run.lr).any():
        draw.text((loss.box[2] + 7, loss.box[1] - 16), "lr_base", fill=LR, font=text)
    draw_frame(draw, loss, log_ticks(*loss.y), lambda v: f"{v:g}", x_labels=True)
    if "loss" in run.raw:
        draw_spread(draw, loss, run.steps, run.raw["loss"], RAW)
    draw_lr(draw, axes["lr"], run.steps, run.lr)
    extra = iter(MORE_COLOURS * 4)
    colours = {k: TERM_COLOURS.get(k) or next(extra) for k in run.smooth}
    for k in reversed(list(run.smooth)):  # the total on top
        draw_curve(draw, loss, run.steps, run.smooth[k], colours[k])
    entries = [(f"{'loss (total)' if k == 'loss' else k} {last_finite(v):.3g}", colours[k], False)
               for k, v in run.smooth.items()]
    lr_last = last_finite(run.lr)
    if math.isfinite(lr_last):
        entries.append((f"lr_base {sci_text(lr_last)}", LR, True))
    draw_legend(draw, loss.box[1], entries)

    # AP and AP50 at each evaluation
    ap = axes["ap"]
    draw.text((ap.box[0], ap.box[1] - 16), "AP and AP50 on the val split (%), at each evaluation",
              fill=BLACK, font=text)
    draw_frame(draw, ap, nice_ticks(*ap.y, n=5), lambda v: f"{v:g}", x_labels=True)
    entries = []
    for i, key in enumerate(AP_COLOURS):
        points = [ap.xy(e[0], e[1 + i]) for e in run.evals if math.isfinite(e[1 + i])]
        if len(points) > 1:
            draw.line(points, fill=AP_COLOURS[key], width=2, joint="curve")
        r = 4 if len(points) <= 60 else 2  # many evaluations: smaller points
        for px, py in points:
            draw.ellipse([px - r, py - r, px + r, py + r], fill=AP_COLOURS[key])
        values = [e[1 + i] for e in run.evals if math.isfinite(e[1 + i])]
        if values:
            entries.append((f"{key} {values[-1]:.1f} (best {max(values):.1f})", AP_COLOURS[key], False))
    if not run.evals:
        draw.text((ap.box[0] + 12, ap.box[1] + 10), "no evaluation in the log yet", fill=(120, 120, 120), font=text)
    draw_legend(draw, ap.box[1], entries)
    label = "optimizer step"
    draw.text(((ap.box[0] + ap.box[2] - draw.textlength(label, font=text)) / 2, ap.box[3] + 22), label,
              fill=BLACK, font=text)
    return image


def save_curves(source, path):
    """draw_curves(source) written to `path` (PNG); returns the picture."""
    image = draw_curves(source)
    image.save(path)
    return image


def default_out(source):
    """RUN_DIR/curves.png next to a log.jsonl; NAME.curves.png next to a record file NAME.jsonl.gz."""
    source = str(source)
    if source.endswith(".jsonl.gz"):
        return source[:-len(".jsonl.gz")] + ".curves.png"
    return os.path.join(source if os.path.isdir(source) else os.path.dirname(source), "curves.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a train.py --output-dir, its log.jsonl or a .jsonl.gz record")
    p.add_argument("--out", default=None, help="default: RUN_DIR/curves.png (refuses to overwrite)")
    args = p.parse_args(argv)
    out = args.out or default_out(args.run)
    if os.path.exists(out):
        raise ValueError(f"{out} exists; move or delete it, or pass another --out")
    save_curves(args.run, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
