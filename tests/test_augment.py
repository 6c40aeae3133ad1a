"""Batched colour/HED augmentation: parity with scikit-image's formula, torchvision's colour ops,
and the corrected DINOv2 probabilities measured over many draws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import shardkit
import torch
import torchvision.transforms.functional as TF
from skimage.color import rgb2hed
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

from midnight_train.method import augment
from midnight_train.method.augment import AugmentConfig, ColorAugment, hed_jitter, sample_hed_params

OFF = AugmentConfig(hed_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0,
                    blur_p_local=0.0, solarize_p_global2=0.0)


@pytest.fixture(scope="module")
def tiles(cmu_slide) -> np.ndarray:
    return np.stack(shardkit.tissue_tiles(cmu_slide, 6, size=64, seed=2))  # [6, 64, 64, 3] uint8


def hed_reference(rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """float64 numpy: scikit-image's rgb2hed/hed2rgb formulas without the negative clamp."""
    log_adjust = np.log(1e-6)
    stains = (np.log(np.maximum(rgb, 1e-6)) / log_adjust) @ hed_from_rgb
    stains = stains * alpha[:, None, None, :] + beta[:, None, None, :]
    return np.clip(np.exp((stains * log_adjust) @ rgb_from_hed), 0, 1)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def test_matrices_are_scikit_images():
    np.testing.assert_allclose(augment.RGB_FROM_HED.numpy(), rgb_from_hed, rtol=0, atol=1e-12)
    np.testing.assert_allclose(augment.HED_FROM_RGB.numpy(), hed_from_rgb, rtol=0, atol=1e-12)


def test_hed_identity_is_lossless_unlike_skimage_round_trip(tiles):
    rgb = tiles / 255.0
    out = hed_jitter(to_tensor(rgb), torch.ones(6, 3), torch.zeros(6, 3))
    assert (out - to_tensor(rgb)).abs().max() < 1 / 255
    # our concentrations are skimage's wherever its clamp does not bite
    ours = (np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)) @ hed_from_rgb
    theirs = rgb2hed(rgb)
    unclamped = ours > 0
    np.testing.assert_allclose(ours[unclamped], theirs[unclamped], atol=1e-6)
    assert (~unclamped).any()  # real tissue has negative concentrations: the clamp matters


@pytest.mark.parametrize("sigma", [(0.05, 0.005), (0.25, 0.01), (0.5, 0.05)])
def test_hed_matches_float64_reference(tiles, sigma):
    gen = torch.Generator().manual_seed(1)
    alpha, beta = sample_hed_params(6, sigma[0], sigma[1], gen)
    rgb = tiles / 255.0
    out = hed_jitter(to_tensor(rgb), alpha, beta)
    ref = hed_reference(rgb, alpha.double().numpy(), beta.double().numpy())
    assert np.abs(out.permute(0, 2, 3, 1).double().numpy() - ref).max() < 1 / 255
    assert out.shape == (6, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    if sigma[0] >= 0.25:
        assert (out - to_tensor(rgb)).abs().mean() > 0.01  # it does change the stain


EXACT = 1e-5  # float32 log2/exp2 against the float64 formula (measured: ≤ 5e-6 even off-range)


def test_hed_uint8_input_matches_float_input_and_reference(tiles):
    alpha, beta = sample_hed_params(6, 0.5, 0.05, torch.Generator().manual_seed(3))
    u8 = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    out = hed_jitter(u8, alpha, beta)
    assert out.dtype == torch.float32 and out.shape == (6, 3, 64, 64)
    assert (out - hed_jitter(u8.float() / 255, alpha, beta)).abs().max() < EXACT
    ref = hed_reference(tiles / 255.0, alpha.double().numpy(), beta.double().numpy())
    assert np.abs(out.permute(0, 2, 3, 1).double().numpy() - ref).max() < EXACT
    identity = hed_jitter(u8, torch.ones(6, 3), torch.zeros(6, 3))
    assert (identity - u8 / 255).abs().max() < EXACT
    zeros = hed_jitter(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.ones(1, 3), torch.zeros(1, 3))
    assert zeros.max() < 2e-6  # black goes through the 1e-6 floor, not log(0)


def exact_stain_map(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """`hed_reference` (float64) for tensors [B, 3, H, W], uint8 (v/255) or float in [0, 1]."""
    rgb = images.double() / (255.0 if images.dtype == torch.uint8 else 1.0)
    ref = hed_reference(rgb.permute(0, 2, 3, 1).numpy(), alpha.double().numpy(), beta.double().numpy())
    return torch.from_numpy(ref).permute(0, 3, 1, 2)


def test_hed_matches_exact_formula_on_extreme_parameters_and_any_layout(tiles):
    """Parameters far outside training ranges (exponents below −126 and above 0, black and white
    pixels), uint8 and float64 input, NCHW and channels-last strides: always the float64 formula
    to float32 rounding, finite and in [0, 1]."""
    u8 = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    u8[0, :, :8, :8] = 0
    u8[1, :, :8, :8] = 255
    alpha = torch.tensor([[1.0, 1, 1], [0, 0, 0], [3, 3, 3], [10, 0.1, 5], [-2, 4, 1], [1, 1, 1]])
    beta = torch.tensor([[0.0, 0, 0], [0.5, -0.5, 0], [0, 0, 0], [-1, 2, 0.3], [0, 0, 0], [-5, -5, -5]])
    for images in (u8, u8.double() / 255):
        out = hed_jitter(images, alpha, beta)
        assert out.dtype == (torch.float32 if images.dtype == torch.uint8 else torch.float64)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        exact = exact_stain_map(images, alpha, beta)
        assert (out.double() - exact).abs().max() < EXACT
        assert (exact < 1e-30).any() and (exact == 1).sum() > 100  # both clips were exercised
        channels_last = images.contiguous(memory_format=torch.channels_last)
        assert channels_last.stride(1) == 1  # a different layout, the same numbers
        torch.testing.assert_close(hed_jitter(channels_last, alpha, beta), out, rtol=0, atol=1e-7)


def test_hed_params_ranges():
    alpha, beta = sample_hed_params(20000, [0.1, 0.2, 0.3], 0.02, torch.Generator().manual_seed(0))
    assert alpha.shape == beta.shape == (20000, 3)
    np.testing.assert_allclose(alpha.min(0).values, [0.9, 0.8, 0.7], atol=2e-3)
    np.testing.assert_allclose(alpha.max(0).values, [1.1, 1.2, 1.3], atol=2e-3)
    assert beta.abs().max() <= 0.02 and beta.abs().max() > 0.0199


@pytest.mark.parametrize("op,tv", [
    (augment._brightness, TF.adjust_brightness), (augment._contrast, TF.adjust_contrast),
    (augment._saturation, TF.adjust_saturation), (augment._hue, TF.adjust_hue)])
def test_colour_ops_match_torchvision(tiles, op, tv):
    x = to_tensor(tiles) / 255
    factors = torch.tensor([0.6, 0.9, 1.0, 1.1, 1.3, 1.4]) if op is not augment._hue else \
        torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1])
    ours = op(x.clone(), factors)
    for i, f in enumerate(factors.tolist()):
        assert (ours[i] - tv(x[i], f)).abs().max() < 2e-5


def batch_of(b: int, size: int, seed: int = 0, n_local: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"global_crops": torch.randint(0, 256, (2, b, 3, size, size), dtype=torch.uint8, generator=g),
            "local_crops": torch.randint(0, 256, (n_local, b, 3, size, size), dtype=torch.uint8, generator=g),
            "masks": torch.zeros(2 * b, 4, dtype=torch.bool), "keys": [str(i) for i in range(b)]}


def test_layout_is_crop_major_and_normalised():
    batch = batch_of(3, 8)
    out = ColorAugment(OFF)(batch, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(OFF.mean)[:, None, None], torch.tensor(OFF.std)[:, None, None]
    assert out["global_crops"].shape == (6, 3, 8, 8) and out["local_crops"].shape == (6, 3, 8, 8)
    torch.testing.assert_close(out["global_crops"] * std + mean, batch["global_crops"].flatten(0, 1) / 255)
    torch.testing.assert_close(out["local_crops"] * std + mean, batch["local_crops"].flatten(0, 1) / 255)
    assert out["masks"] is batch["masks"] and out["keys"] == batch["keys"]


def test_deterministic_for_a_generator_state():
    batch, aug = batch_of(4, 16), ColorAugment(AugmentConfig())
    a = aug(batch, torch.Generator().manual_seed(7))
    b = aug(batch, torch.Generator().manual_seed(7))
    c = aug(batch, torch.Generator().manual_seed(8))
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])
    assert not torch.equal(a["global_crops"], c["global_crops"])


def fractions(cfg: AugmentConfig, changed) -> tuple[float, float, float]:
    """Fraction of global crop 1 / global crop 2 / local crops for which changed(in, out) holds."""
    b = 2000
    batch = batch_of(b, 8, n_local=2)
    out = ColorAugment(cfg)(batch, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    xg, yg = batch["global_crops"].flatten(0, 1) / 255, out["global_crops"] * std + mean
    xl, yl = batch["local_crops"].flatten(0, 1) / 255, out["local_crops"] * std + mean
    hit_g, hit_l = changed(xg, yg), changed(xl, yl)
    return hit_g[:b].float().mean().item(), hit_g[b:].float().mean().item(), hit_l.float().mean().item()


def differs(x, y):
    return (x - y).abs().flatten(1).max(1).values > 1e-4


def test_blur_probabilities_are_dinov2s_intended_ones():
    cfg = dataclasses.replace(OFF, blur_p_global1=1.0, blur_p_global2=0.1, blur_p_local=0.5, blur_sigma=[1.0, 2.0])
    g1, g2, loc = fractions(cfg, differs)
    assert g1 == 1.0 and abs(g2 - 0.1) < 0.025 and abs(loc - 0.5) < 0.03


def test_blur_as_dinov2s_released_code_inverts_each_probability():
    """DINOv2's released GaussianBlur(p) hands 1 - p to RandomApply: 0 / 0.9 / 0.5."""
    cfg = dataclasses.replace(OFF, blur_p_global1=1.0, blur_p_global2=0.1, blur_p_local=0.5,
                              blur_sigma=[1.0, 2.0], blur_convention="dinov2_released")
    g1, g2, loc = fractions(cfg, differs)
    assert g1 == 0.0 and abs(g2 - 0.9) < 0.025 and abs(loc - 0.5) < 0.03
    with pytest.raises(ValueError, match="blur_convention"):
        dataclasses.replace(cfg, blur_convention="inverted").blur_probabilities()


def test_solarize_only_on_global_crop_2():
    cfg = dataclasses.replace(OFF, solarize_p_global2=0.2)
    g1, g2, loc = fractions(cfg, differs)
    assert g1 == 0.0 and loc == 0.0 and abs(g2 - 0.2) < 0.025
    # solarized crops are inverted exactly above the threshold
    batch = batch_of(200, 8)
    out = ColorAugment(cfg)(batch, torch.Generator().manual_seed(0))["global_crops"]
    y = out * torch.tensor(cfg.std)[:, None, None] + torch.tensor(cfg.mean)[:, None, None]
    x = batch["global_crops"].flatten(0, 1) / 255
    hit = differs(x, y)
    torch.testing.assert_close(y[hit], torch.where(x[hit] >= 128 / 255, 1 - x[hit], x[hit]))


def test_grayscale_and_jitter_probabilities():
    gray = dataclasses.replace(OFF, grayscale_p=0.2)
    rates = fractions(gray, lambda x, y: ((y[:, 0] - y[:, 1]).abs().max(-1).values.max(-1).values < 1e-6))
    assert all(abs(r - 0.2) < 0.03 for r in rates)
    jitter = dataclasses.replace(OFF, jitter_p=0.8)
    assert all(abs(r - 0.8) < 0.03 for r in fractions(jitter, differs))
    hed = dataclasses.replace(OFF, hed_p=0.5)
    assert all(abs(r - 0.5) < 0.035 for r in fractions(hed, differs))


def test_full_chain_on_real_crops_stays_finite(tiles):
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    batch = {"global_crops": torch.stack([x, x.flip(-1)]), "local_crops": x[None, :, :, :32, :32].repeat(3, 1, 1, 1, 1),
             "masks": torch.zeros(12, 16, dtype=torch.bool), "keys": list("abcdef")}
    out = ColorAugment(AugmentConfig())(batch, torch.Generator().manual_seed(0))
    assert out["global_crops"].dtype == torch.float32 and torch.isfinite(out["global_crops"]).all()
    assert out["local_crops"].shape == (18, 3, 32, 32) and torch.isfinite(out["local_crops"]).all()
