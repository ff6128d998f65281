"""Tests of tools/gpu_check.py on a machine without CUDA: the parts that need it say so, the amp part runs."""

import pytest
import torch

from tools import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's report")
def test_gpu_check_runs_on_the_cpu_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "report.md"
    lines = gpu_check.main(["--models", "smca", "--steps", "2", "--out", str(out)])
    assert out.read_text() == "\n".join(lines) + "\n"
    for part in ("outputs: skipped (no CUDA device)", "ddp (NCCL): skipped (no CUDA device)",
                 "memory: skipped (no CUDA device)", "compile: skipped (no CUDA device)", "amp fp16: skipped (CPU)"):
        assert part in lines
    row = next(line for line in lines if line.startswith("| smca |"))
    float32, bf16, rel = (cell.strip() for cell in row.strip("|").split("|")[1:])
    assert len(float32.split(", ")) == 2 and "NOT FINITE" not in rel
    assert 0 < float(rel) < 0.5  # bf16 near float32, not equal
    with pytest.raises(ValueError, match="exists; nothing is overwritten"):
        gpu_check.main(["--models", "smca", "--out", str(out)])


def test_gpu_check_padded_batch_marks_each_images_padding():
    images, pad_mask = gpu_check.padded_batch()
    assert images.shape == (2, 3, 320, 480) and not pad_mask[0].any()
    assert (~pad_mask[1]).sum() == 256 * 384 and images[1, :, 256:].abs().sum() == 0
