"""The blockiness metric separates nearest-upsampled latents from unstructured ones."""

import torch
import torch.nn.functional as F

from src.eval.blockiness import blockiness
from src.flow.pyramid import upsample


def test_nearest_upsampled_latents_score_one_and_noise_scores_zero():
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(4, 8, 3, 8, 8, generator=g)
    blocky = upsample(coarse)  # the pyramid's plain 2x upsampling (B, C, T, 16, 16)
    assert torch.allclose(blockiness(blocky), torch.ones(4), atol=1e-6)
    noise = torch.randn(4, 8, 3, 64, 64, generator=g)
    assert blockiness(noise).abs().max() < 0.02
    smooth = F.avg_pool2d(torch.randn(4, 8, 68, 68, generator=g), 5, stride=1)  # (4, 8, 64, 64)
    assert blockiness(smooth).abs().max() < 0.02


def test_blockiness_grows_with_the_share_of_block_structure():
    g = torch.Generator().manual_seed(1)
    blocky = upsample(torch.randn(2, 4, 1, 16, 16, generator=g))
    noise = torch.randn(2, 4, 1, 32, 32, generator=g)
    scores = [float(blockiness(blocky + a * noise).mean()) for a in (0.0, 0.3, 1.0, 3.0)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99 > scores[-1]


def test_period_four_sees_the_first_jump_of_a_three_stage_pyramid():
    g = torch.Generator().manual_seed(2)
    coarse = upsample(upsample(torch.randn(2, 4, 1, 8, 8, generator=g)))  # 4x4 blocks
    fine = coarse + 0.5 * upsample(torch.randn(2, 4, 1, 16, 16, generator=g))  # + 2x2 detail
    assert float(blockiness(coarse, 4).min()) > 0.99
    assert float(blockiness(fine, 4).min()) > 0.3  # the 4x4 structure is still seen
    assert float(blockiness(torch.randn(2, 4, 1, 64, 64, generator=g), 4).abs().max()) < 0.03
