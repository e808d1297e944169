"""ImagePreprocessor against the Hugging Face ConvNeXt image processor it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_utils import load_image

from conftest import CONVNEXT_BASE_PREPROCESSOR, write_preprocessor
from datamodules import DataError, ImagePreprocessor, load_image_processor
from datamodules.images import READABLE_MODES, mode_problem
from tolerances import U32

#: The same uint8 crop (PIL resizes and crops it alike on both sides), normalised on each side by
#: a chain of three float32 roundings of ``(x r - m) / s`` (ours: ``x (r / s) + (-m / s)`` with its
#: two rounded constants; Hugging Face: rescale, subtract, divide), each within ``3 u`` of the value
#: scale ``(|x r| + |m|) / s <= (1 + max m) / min s``: at most ``6 u`` of that apart (2.4e-6 for
#: ImageNet's mean and std), below the 1e-5 the README promises.
TOLERANCE = 6 * U32 * (1 + max(CONVNEXT_BASE_PREPROCESSOR["image_mean"])) / min(CONVNEXT_BASE_PREPROCESSOR["image_std"])


def reference(processor, image: Image.Image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def max_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    return float((ours - theirs).abs().max())


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


@pytest.fixture(scope="module")
def base(convnext_base_processor):
    """``(ours, Hugging Face)`` for facebook/convnext-base-224's processor config."""
    return ImagePreprocessor.from_pretrained(convnext_base_processor), AutoImageProcessor.from_pretrained(convnext_base_processor)


def test_settings_are_read_from_the_config(base):
    ours, _ = base
    assert ours.size == CONVNEXT_BASE_PREPROCESSOR["size"]
    assert ours.crop_pct == CONVNEXT_BASE_PREPROCESSOR["crop_pct"]
    assert ours.resample == Image.Resampling.BICUBIC
    assert ours.mean == tuple(CONVNEXT_BASE_PREPROCESSOR["image_mean"])
    assert ours.std == tuple(CONVNEXT_BASE_PREPROCESSOR["image_std"])
    assert ImagePreprocessor.from_processor(ours.to_processor()) == ours


def test_parity_on_real_dtd_jpegs(base, shared_dir):
    ours, processor = base
    files = sorted((shared_dir / "data" / "dtd-10class-sample").glob("*/*.jpg"))
    assert len(files) == 40
    sizes = set()
    for file in files:
        with Image.open(file) as image:
            image.load()
            sizes.add(image.size)
            output = ours(image)
            assert output.shape == (3, 224, 224)
            assert max_difference(output, reference(processor, image)) <= TOLERANCE, file.name
    assert any(width != height for width, height in sizes), "the sample should hold non-square images"


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_become_rgb(mode, base):
    ours, processor = base
    image = random_image(150, 110, mode, seed=1)
    output = ours(image)
    assert output.shape == (3, 224, 224)
    assert torch.equal(output, ours(image.convert("RGB")))
    assert max_difference(output, reference(processor, image.convert("RGB"))) <= TOLERANCE
    if mode == "L":
        assert not torch.equal(output[0], output[1]), "channels must keep their own mean and std"


@pytest.mark.parametrize("size", [224, 32, 384])
def test_real_grayscale_digits_give_the_pixels_of_converting_first(size, shared_dir, tmp_path):
    # Grayscale is resized as one band and made RGB last: exactly the pixels of RGB first.
    import gzip

    raw = gzip.decompress((shared_dir / "data" / "mnist-t10k" / "t10k-images-idx3-ubyte.gz").read_bytes())
    digits = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:100]
    directory = write_preprocessor(tmp_path / "processor", {**CONVNEXT_BASE_PREPROCESSOR, "size": size})
    ours, processor = ImagePreprocessor.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory)
    for digit in digits:
        image = Image.fromarray(digit, mode="L")
        assert torch.equal(ours.to_uint8_tensor(image), ours.to_uint8_tensor(image.convert("RGB")))
        assert max_difference(ours(image), reference(processor, image.convert("RGB"))) <= TOLERANCE


@pytest.mark.parametrize(("width", "height"), [(13, 29), (41, 17), (256, 300), (300, 256), (257, 256)])
def test_small_and_exact_sizes(width, height, base):
    # Upsampling non-square images, and the no-resize case (shorter side already 256).
    ours, processor = base
    image = random_image(width, height, seed=width)
    assert max_difference(ours(image), reference(processor, image)) <= TOLERANCE


@pytest.mark.parametrize(("width", "height"), [(45, 20), (20, 45), (32, 32)])
def test_tiny_processor(width, height, tiny_processor):
    ours = ImagePreprocessor.from_pretrained(tiny_processor)
    processor = AutoImageProcessor.from_pretrained(tiny_processor)
    image = random_image(width, height, seed=height)
    output = ours(image)
    assert output.shape == (3, 32, 32)
    assert max_difference(output, reference(processor, image)) <= TOLERANCE


@pytest.mark.parametrize("size", [384, 416])
def test_large_size_warps_without_crop(size, tmp_path):
    # At 384 and above the processor resizes to a square (aspect not kept) and does not crop.
    directory = write_preprocessor(tmp_path / "large", {**CONVNEXT_BASE_PREPROCESSOR, "size": size})
    ours = ImagePreprocessor.from_pretrained(directory)
    processor = AutoImageProcessor.from_pretrained(directory)
    image = random_image(500, 300, seed=size)
    output = ours(image)
    assert output.shape == (3, size, size)
    assert max_difference(output, reference(processor, image)) <= TOLERANCE
    warped = np.array(image.resize((size, size), resample=Image.Resampling.BICUBIC))
    assert torch.equal(ours.to_uint8_tensor(image), torch.from_numpy(warped).permute(2, 0, 1))


def test_missing_processor_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_processor(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no preprocessor_config.json"):
        load_image_processor(str(tmp_path / "empty"))


# --- every image mode: read as the Hugging Face pipeline reads it, or refused ----------------------


def mode_images() -> dict[str, Image.Image]:
    """One image per mode ``READABLE_MODES`` names (a palette one with a transparent colour too),
    made from random RGBA pixels whose alpha is not all opaque."""
    rgba = random_image(150, 110, "RGBA", seed=3)
    rgb = rgba.convert("RGB")
    transparent = rgb.convert("P")
    transparent.info["transparency"] = 0
    images = {mode: rgba.convert(mode) for mode in ("LA", "PA", "RGBa")}
    images |= {mode: rgb.convert(mode) for mode in ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")}
    return {**images, "RGBA": rgba, "P with a transparent colour": transparent}


def test_every_readable_mode_is_read_as_the_pipeline_reads_it(base):
    """``pipeline("image-classification")`` runs ``load_image`` (``convert("RGB")``: alpha dropped, not
    composited on white as the processor's own ``do_convert_rgb`` would) and then the processor."""
    ours, processor = base
    images = mode_images()
    assert {image.mode for image in images.values()} == set(READABLE_MODES), "a mode without a test"
    for name, image in images.items():
        assert max_difference(ours(image), reference(processor, load_image(image))) <= TOLERANCE, name


REFUSED = {
    "I;16": np.uint16,  # 16-bit PNGs (the digits)
    "I;16B": np.dtype(">u2"),
    "I": np.int32,
    "F": np.float32,
}


@pytest.mark.parametrize("mode", REFUSED)
def test_modes_that_would_be_clipped_are_refused(mode, base):
    ours, processor = base
    pixels = np.random.default_rng(0).integers(0, 60000, (40, 50)).astype(REFUSED[mode])
    image = Image.fromarray(pixels) if mode != "I;16B" else Image.fromarray(pixels.astype(np.uint16)).convert("I;16B")
    assert image.mode == mode
    assert np.asarray(image.convert("RGB")).max() == 255 < pixels.max(), "convert('RGB') clips: what is refused"
    with pytest.raises(DataError, match=rf"^image mode '{mode}' \(.*pixels\) cannot be made 8-bit RGB without clipping"):
        ours(image)
    with pytest.raises(ValueError):  # the Hugging Face processor refuses it too (the message says so)
        reference(processor, image)
    assert mode_problem(mode) is not None and mode_problem("L") is None


def test_a_mode_pil_cannot_make_rgb_is_refused(base):
    ours, _ = base
    image = random_image(20, 10, "RGBA").convert("LA").convert("La")
    with pytest.raises(DataError, match=r"^image mode 'La' cannot be made RGB$"):
        ours(image)
