"""LISA's preprocessing (cspexp.models.processor) against hand computations and oracles.

- CLIP branch: transformers' ``CLIPImageProcessor`` (its Pillow backend, the one LISA's transformers
  4.31 had) configured like ``openai/clip-vit-large-patch14``'s preprocessor_config, on non-square images.
- SAM branch: ``ResizeLongestSide.get_preprocess_shape`` worked out by hand; Pillow's bilinear resize,
  which LISA reaches through torchvision (``F_pil.resize`` is ``img.resize(size[::-1], BILINEAR)``),
  worked out by hand on a 2×2 image; SAM's normalisation and the zero padding bottom-right.
- Mask post-processing: upsample to SAM's size, crop the padding, resize to the original size, on a
  hand-made low-resolution mask, against bilinear interpolation worked out by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cspexp.models.lisa import LisaModel
from cspexp.models.processor import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, clip_preprocess, sam_preprocess, sam_resized_shape

# ------------------------------------------------------------------------------------------ CLIP


@pytest.fixture(scope="module")
def clip_processor():
    """openai/clip-vit-large-patch14's preprocessor_config.json: size 224 (shortest edge), crop 224,
    resample 3 (bicubic), CLIP mean / std, rescale 1/255."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 427), (300, 451), (500, 375), (225, 224),
                                (97, 1000), (100, 150), (224, 224)])
def test_clip_branch_equals_clip_image_processor(clip_processor, hw):
    # Noise makes any difference in the resized size or the crop offset show (a smooth image hides it).
    image = np.random.default_rng(hw[0] * 7 + hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    expected = clip_processor(images=image, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
    got = clip_preprocess(image, 224).numpy()
    assert got.shape == (3, 224, 224)
    assert np.abs(got - expected).max() <= 1e-6


def test_clip_branch_by_hand():
    # A constant colour stays constant through any resampling: (c / 255 − mean) / std per channel.
    image = np.zeros((30, 50, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    got = clip_preprocess(image, 224).numpy()
    for ch, c in enumerate((200, 100, 50)):
        assert np.allclose(got[ch], (c / 255 - CLIP_MEAN[ch]) / CLIP_STD[ch], atol=1e-6)
    # Short side already 224: no resampling, only the centre crop, left = (300 − 224) // 2 = 38.
    cols = np.tile((np.arange(300) % 256).astype(np.uint8)[None, :, None], (224, 1, 3))
    got = clip_preprocess(cols, 224).numpy()
    assert np.allclose(got[0, 0] * CLIP_STD[0] + CLIP_MEAN[0], (np.arange(38, 262) % 256) / 255, atol=1e-6)


# ------------------------------------------------------------------------------------------ SAM


@pytest.mark.parametrize(
    ("hw", "long_side", "expected"),
    [  # int(x · long_side / max(h, w) + 0.5), worked out by hand
        ((480, 640), 1024, (768, 1024)),   # 480 · 1.6 = 768
        ((427, 640), 1024, (683, 1024)),   # 683.2 → 683
        ((333, 500), 1024, (682, 1024)),   # 681.984 → 682
        ((640, 427), 1024, (1024, 683)),
        ((600, 600), 1024, (1024, 1024)),
        ((1000, 1), 1024, (1024, 1)),      # 1.024 → 1
        ((3, 5), 8, (5, 8)),               # 4.8 → 5
        ((5, 3), 8, (8, 5)),
        ((5, 10), 8, (4, 8)),              # exactly 4.0
        ((7, 10), 8, (6, 8)),              # 5.6 → 6
    ],
)
def test_sam_resize_shape_by_hand(hw, long_side, expected):
    assert sam_resized_shape(*hw, long_side) == expected


def test_sam_branch_normalises_and_pads_bottom_right():
    image = np.zeros((3, 5, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    pixels, resized = sam_preprocess(image, 8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32 and resized == (5, 8)
    for ch, c in enumerate((10, 20, 30)):
        assert torch.allclose(pixels[ch, :5, :], torch.full((5, 8), (c - SAM_MEAN[ch]) / SAM_STD[ch]), atol=1e-6)
    assert torch.all(pixels[:, 5:, :] == 0)  # padding after normalisation: zeros, not the mean colour


def test_sam_branch_bilinear_by_hand():
    """A 2×2 image [[0, 255], [0, 255]] upscaled to 4×4. Pillow's bilinear (antialiased, exact for
    upscaling) samples output pixel i at the input position (i + ½)·2/4 − ½ = −0.25, 0.25, 0.75, 1.25
    with edge clamping: 0, 0.25·255 = 63.75 → 64, 0.75·255 = 191.25 → 191, 255."""
    image = np.zeros((2, 2, 3), np.uint8)
    image[:, 1] = 255
    pixels, resized = sam_preprocess(image, 4)
    assert resized == (4, 4)
    row = np.array([0, 64, 191, 255], np.float32)
    for ch in range(3):
        expected = np.tile((row - SAM_MEAN[ch]) / SAM_STD[ch], (4, 1))
        assert np.allclose(pixels[ch].numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ masks


def test_mask_postprocessing_by_hand():
    """Low-res logits r[y] + c[x] with r = [0, 4], c = [−1, 1] (bilinear interpolation is separable).
    SAM size 8, original 3×5 → resized 5×8 (4.8 → 5). By hand, with align_corners=False sampling
    positions (i + ½)·in/out − ½ clamped to the edges:
      columns: 2 → 8: [−1, −1, −.75, −.25, .25, .75, 1, 1]; 8 → 5 at 0.3, 1.9, 3.5, 5.1, 6.7:
               [−1, −.775, 0, .775, 1]
      rows:    2 → 8: [0, 0, .5, 1.5, 2.5, 3.5, 4, 4]; crop to 5 rows; 5 → 3 at 1/3, 2, 11/3:
               [0, .5, 2.1667]  (without the crop it would be [0, 2, 4])."""
    low = torch.tensor([[-1.0, 1.0], [3.0, 5.0]])
    fake = SimpleNamespace(sam=SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=8))))
    resized = sam_resized_shape(3, 5, 8)
    assert resized == (5, 8)
    got = LisaModel.postprocess_masks(fake, low, torch.tensor(resized), torch.tensor([3, 5]))
    rows = np.array([0.0, 0.5, 1.5 + 2 / 3])
    cols = np.array([-1.0, -0.775, 0.0, 0.775, 1.0])
    assert got.shape == (3, 5) and got.dtype == torch.float32
    assert np.allclose(got.numpy(), rows[:, None] + cols[None, :], atol=1e-5)
    # LISA's mask: logits > 0
    assert ((got > 0).numpy() == np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)).all()
