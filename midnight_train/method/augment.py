"""Batched colour augmentation on the model's device: HED stain jitter + DINOv2's colour chain.

`ColorAugment(cfg)(batch, generator)` takes a loader batch (`midnight_train.data.loader`) already moved
to the device and returns it with `global_crops` as float [2·B, 3, G, G] (crop-major, matching
`masks`) and `local_crops` as float [n_local·B, 3, L, L], both normalised. Every crop gets its own
parameters, in this order (DINOv2's chain with HED in front, as a stain change happens before
any camera/colour effect):

1. HED jitter (Tellez et al. 2019), p = `hed_p`: per crop and stain channel
   α ~ U(1 − σα, 1 + σα), β ~ U(−σβ, σβ), concentrations in scikit-image units (below);
2. colour jitter, p 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, applied in a
   random order per crop (as torchvision's ColorJitter);
3. grayscale, p 0.2;
4. Gaussian blur, σ ~ U(0.1, 2): p 1.0 on global crop 1, 0.1 on global crop 2, 0.5 on local
   crops — the intended DINOv2 values. DINOv2's released code passes 1 − p to RandomApply (a
   known bug, fixed in later code): its weights, which we start from, were trained blurring
   0 / 0.9 / 0.5; ``blur_convention: dinov2_released`` reproduces that;
5. solarize (threshold 128/255), p 0.2 on global crop 2 only;
6. normalise with mean/std.

All random numbers come from the given torch.Generator (drawn on its device, then moved), in a
fixed order, so a generator state gives the same output. Branch-free on the device: every step
is computed for every crop and blended in by the crop's own flag (``torch.where``), and the
constants are made once per device, so the host never waits for the device here (no
``nonzero``, no ``bool()`` of a device tensor, no host-to-device copy in a call).

HED units. `hed_jitter` uses scikit-image's `rgb2hed` convention without its clamp: optical
density `od = log(max(rgb, 1e-6)) / log(1e-6)` (so od ∈ [0, 1]), stains = od @ hed_from_rgb,
back with rgb = exp(log(1e-6) · stains @ rgb_from_hed), clipped to [0, 1]. Because od is divided
by −log(1e-6) ≈ 13.8, H&E concentrations of real tissue are ≈ 0–0.15, so β must be small.
Defaults, chosen by looking at `midnight-train data preview --hed-only` on the CMU H&E tile:
σα = 0.25 (stain amount ±25 %) and σβ = 0.01 per channel (an offset adds stain everywhere,
glass included: 0.015 already gave visibly pink or lilac backgrounds, 0.008–0.01 keeps the
background near-white while shifting the H/E balance); DAB gets the same ranges (absent in H&E,
it adds at most a faint brown cast).
Tellez's "light" 0.05 / "strong" 0.2 refer to α; their β scale does not carry over to these units.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Ruifrok & Johnston H, E, DAB stain vectors (rows), as in skimage.color.rgb_from_hed.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
                            dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
LOG2_ADJUST = math.log2(1e-6)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
HUE_OFFSETS = (5.0, 3.0, 1.0)  # HSV -> RGB k-offsets


@functools.lru_cache(maxsize=128)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant on ``device``, copied there once (a copy per call would make the host
    wait for the device)."""
    return torch.tensor(values, dtype=dtype, device=device)


_HED_ROWS = tuple(tuple(tuple(r) for r in m.tolist()) for m in (RGB_FROM_HED, HED_FROM_RGB))


def _hed_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rgb_from_hed, hed_from_rgb) in float64 on ``device``."""
    return (_constant(_HED_ROWS[0], device, torch.float64),
            _constant(_HED_ROWS[1], device, torch.float64))


@dataclass
class AugmentConfig:
    """The `augment:` section of the training config (plain YAML types)."""

    hed_p: float = 1.0
    hed_sigma_alpha: float | list[float] = 0.25  # one value, or [H, E, D]
    hed_sigma_beta: float | list[float] = 0.01
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_global1: float = 1.0
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    blur_sigma: tuple[float, float] | list[float] = (0.1, 2.0)
    # intended: blur with the three probabilities above; dinov2_released: with 1 - each, as
    # DINOv2's released code does (0 / 0.9 / 0.5 for the defaults)
    blur_convention: str = "intended"
    solarize_p_global2: float = 0.2
    # The published Midnight models' normalisation; ImageNet's is (0.485, 0.456, 0.406) /
    # (0.229, 0.224, 0.225). Exports record it, and `embed` / `eval` apply it.
    mean: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5)

    def blur_probabilities(self) -> tuple[float, float, float]:
        """The blur probabilities applied to global crop 1, global crop 2 and local crops."""
        ps = (self.blur_p_global1, self.blur_p_global2, self.blur_p_local)
        if self.blur_convention == "dinov2_released":
            return tuple(1.0 - p for p in ps)  # type: ignore[return-value]
        if self.blur_convention != "intended":
            raise ValueError(f"augment.blur_convention={self.blur_convention!r} (must be "
                             f"intended or dinov2_released)")
        return ps


BLUR_CONVENTIONS = ("intended", "dinov2_released")


def _hed_log2_affine(alpha: torch.Tensor, beta: torch.Tensor, device: torch.device,
                     scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-image map of `hed_jitter` in log2 space, for pixel values v = scale · rgb:
    log2 rgb' = matrix @ log2 v + shift, as float32 (matrix [B, 3 out, 3 in], shift [B, 3 out]).

    With M = hed_from_rgb, R = M⁻¹ = rgb_from_hed (row vectors, skimage's convention) and
    od = ln(rgb) / ln(1e-6): stains = od M, stains' = stains diag(α) + β, ln rgb' = ln(1e-6) stains' R
    = ln(rgb) (M diag(α) R) + ln(1e-6) β R. The base change to log2 divides both sides by ln 2,
    so the matrix is unchanged and only the shift is scaled (exp2/log2 are cheaper than exp/log);
    log2 rgb = log2 v − log2 scale folds the input scale (255 for uint8) into the shift too."""
    alpha64 = alpha.to(device, torch.float64)
    beta64 = beta.to(device, torch.float64)
    h2r, r2h = _hed_matrices(device)
    matrix = ((r2h[None] * alpha64[:, None, :]) @ h2r).transpose(1, 2)  # [B, 3 out, 3 in]
    shift = LOG2_ADJUST * (beta64 @ h2r) - math.log2(scale) * matrix.sum(2)  # [B, 3 out]
    return matrix.float().contiguous(), shift.float().contiguous()


def hed_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale/shift stain concentrations: images float [B, 3, H, W] in [0, 1], alpha/beta [B, 3]
    in H, E, D order (units in the module docstring); returns [B, 3, H, W] in [0, 1], in the
    images' dtype. α = 1, β = 0 is the identity up to float32 rounding (and the 1e-6 floor).
    uint8 images (values v/255) are accepted too and give float32.

    The whole round trip is one per-image 3×3 product in log space (`_hed_log2_affine`); per
    pixel that is 3 log2, 9 multiply-adds and 3 exp2, in float32 with torch's own functions
    (within 1e-5 of the float64 formula), the same plain element-wise ops on every device. On the
    CPU each op is a pass over memory (~2.5× scikit-image per core, BENCHMARKS.md); in training
    this runs on the GPU."""
    b, c, h, w = images.shape
    if c != 3:
        raise ValueError(f"hed_jitter expects RGB images [B, 3, H, W], got {tuple(images.shape)}")
    from_uint8 = images.dtype == torch.uint8
    scale = 255.0 if from_uint8 else 1.0
    matrix, shift = _hed_log2_affine(alpha, beta, images.device, scale)
    # clamp_min returns a new tensor, so log2 can work in place without touching `images`
    logs = images.reshape(b, 3, h * w).to(torch.float32).clamp_min(1e-6 * scale).log2_()
    out = torch.stack([shift[:, k, None] + matrix[:, k, 0, None] * logs[:, 0]
                       + matrix[:, k, 1, None] * logs[:, 1] + matrix[:, k, 2, None] * logs[:, 2]
                       for k in range(3)], 1)
    out = out.clamp_max_(0.0).exp2_().view(b, 3, h, w)  # exp2 of a value ≤ 0: already ≤ 1
    return out if from_uint8 else out.to(images.dtype)


def _as3(value: float | list[float], device: torch.device) -> torch.Tensor:
    values = tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    return _constant(values, device, torch.float32)


def sample_hed_params(n: int, sigma_alpha: float | list[float], sigma_beta: float | list[float],
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) [n, 3] on the generator's device: α ~ U(1 − σα, 1 + σα), β ~ U(−σβ, σβ)."""
    dev = generator.device
    u = torch.rand((2, n, 3), generator=generator, device=dev) * 2 - 1
    return 1 + u[0] * _as3(sigma_alpha, dev), u[1] * _as3(sigma_beta, dev)


# ------------------------------------------------------------------- colour ops (per image)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = _constant(GRAY_WEIGHTS, x.device, x.dtype)
    return torch.einsum("bchw,c->bhw", x, w)[:, None]


def _bc(f: torch.Tensor) -> torch.Tensor:
    return f[:, None, None, None]


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _bc(f)).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (x * _bc(f) + mean * (1 - _bc(f))).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _bc(f) + _gray(x) * (1 - _bc(f))).clamp_(0, 1)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by f (fraction of a turn) via HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = torch.remainder(h + _bc(f)[:, 0], 1.0)
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    # HSV → RGB with the k-offset formula: c = v - v·s·clamp(min(k, 4 - k), 0, 1)
    k = torch.remainder(_constant(HUE_OFFSETS, x.device, x.dtype)[None, :, None, None]
                        + h[:, None] * 6, 6)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-image σ (kernel radius 3·max σ, reflect padding)."""
    n, c, h, w = x.shape
    radius = min(int(math.ceil(3 * max_sigma)), h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n·c, K]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


class ColorAugment:
    """Batched colour augmentation (see the module docstring); call with a device batch."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def _rand(self, gen: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, device=gen.device)

    def augment(self, x: torch.Tensor, blur_p: torch.Tensor, solarize_p: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
        """Steps 1–5 on images [n, 3, H, W] (uint8, or float in [0, 1]) with per-image blur/solarize
        p; returns float in [0, 1]. uint8 input goes straight into `hed_jitter` (no float copy first)."""
        cfg, n, dev = self.cfg, x.shape[0], x.device
        # Draw everything first, in a fixed order, so the sequence never depends on the data.
        hed_on = self._rand(gen, n) < cfg.hed_p
        alpha, beta = sample_hed_params(n, cfg.hed_sigma_alpha, cfg.hed_sigma_beta, gen)
        jitter_on = self._rand(gen, n) < cfg.jitter_p
        u = self._rand(gen, n, 4) * 2 - 1
        order = torch.argsort(self._rand(gen, n, 4), dim=1)
        gray_on = self._rand(gen, n) < cfg.grayscale_p
        blur_on = self._rand(gen, n) < blur_p.to(gen.device)
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * self._rand(gen, n)
        solarize_on = self._rand(gen, n) < solarize_p.to(gen.device)
        hed_on, alpha, beta, jitter_on, u, order, gray_on, blur_on, sigma, solarize_on = (
            t.to(dev) for t in (hed_on, alpha, beta, jitter_on, u, order, gray_on, blur_on, sigma, solarize_on))

        def on(flags: torch.Tensor) -> torch.Tensor:
            return flags[:, None, None, None]

        if cfg.hed_p >= 1:  # the default: every crop (a config choice, not the data's)
            x = hed_jitter(x, alpha, beta)  # a new tensor
        else:  # crops without HED stay exact (hed_jitter's α = 1, β = 0 is identity only to ~1e-6)
            plain = x.float().div_(255) if x.dtype == torch.uint8 else x.clone()
            x = torch.where(on(hed_on), hed_jitter(x, alpha, beta).to(plain.dtype), plain)
        # Each step is computed for every crop and taken where the crop's flag says so.
        factors = torch.stack([1 + u[:, 0] * cfg.brightness, 1 + u[:, 1] * cfg.contrast,
                               1 + u[:, 2] * cfg.saturation, u[:, 3] * cfg.hue], 1).to(x.dtype)
        ops = (_brightness, _contrast, _saturation, _hue)
        for step in range(4):
            for op_index, op in enumerate(ops):
                chosen = jitter_on & (order[:, step] == op_index)
                x = torch.where(on(chosen), op(x, factors[:, op_index]), x)
        x = torch.where(on(gray_on), _gray(x).expand(-1, 3, -1, -1), x)
        x = torch.where(on(blur_on), gaussian_blur(x, sigma, hi), x)
        return torch.where(on(solarize_on) & (x >= 128 / 255), 1 - x, x)

    def _normalize_(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std in place, for the tensors `augment` returns (its own)."""
        mean = _constant(tuple(self.cfg.mean), x.device, x.dtype)[None, :, None, None]
        std = _constant(tuple(self.cfg.std), x.device, x.dtype)[None, :, None, None]
        return x.sub_(mean).div_(std)

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        cfg = self.cfg
        g, loc = batch["global_crops"], batch["local_crops"]
        b = g.shape[1]
        # uint8 crops go to `augment` as they are (HED reads them directly); anything else
        # holds 0…255 values as well and is scaled here. The loader hands crops over channels
        # last (NHWC strides); `.contiguous()` makes them NCHW first (a cheap copy on the device,
        # none for NCHW input), so every step sees the same layout and gives the same numbers.
        xg, xl = (x if x.dtype == torch.uint8 else x.float() / 255  # never in place: the batch's
                  for x in (g.flatten(0, 1).contiguous(), loc.flatten(0, 1).contiguous()))
        dev = generator.device
        blur1, blur2, blur_local = cfg.blur_probabilities()
        blur_g = torch.cat([torch.full((b,), blur1, device=dev),
                            torch.full((b,), blur2, device=dev)])
        sol_g = torch.cat([torch.zeros(b, device=dev), torch.full((b,), cfg.solarize_p_global2, device=dev)])
        n_local = xl.shape[0]
        out = dict(batch)
        out["global_crops"] = self._normalize_(self.augment(xg, blur_g, sol_g, generator))
        out["local_crops"] = self._normalize_(self.augment(
            xl, torch.full((n_local,), blur_local, device=dev), torch.zeros(n_local, device=dev), generator))
        return out
