"""ImagePreprocessor against the Hugging Face image processors it replaces, family by family.

Each family's processor is built offline from its hub checkpoint's ``preprocessor_config.json``
(``conftest.PREPROCESSORS``, sources in ``conftest.PREPROCESSOR_SOURCES``) and loaded with
``AutoImageProcessor.from_pretrained``, as a user loads it; ours is compared with it on the real
images of ``../shared/data`` (DTD JPEGs of many sizes, GTSRB PPMs, MNIST digits), on the image
modes the pipeline reads and on sizes that take every branch of the resize and the crop.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_utils import load_image

import test_bad_input
from conftest import CONVNEXT_BASE_PREPROCESSOR, PREPROCESSOR_SOURCES, PREPROCESSORS, write_dataset, write_preprocessor
from datamodules import DataError, ImagePreprocessor, load_image_processor
from datamodules.images import READABLE_MODES, mode_problem
from test_bad_input import one_error_line, small_dataset, train_args
from tolerances import U32
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

# test_bad_input.py's tiny ConvNeXt checkpoint (32-pixel processor), for the CLI test.
convnext = test_bad_input.convnext


def normalisation_tolerance(settings: dict) -> float:
    """Bound on ours minus Hugging Face's output for one processor ``settings``.

    The same uint8 crop (PIL resizes and crops it alike on both sides), normalised on each side by
    a chain of three float32 roundings of ``(x r - m) / s`` (ours: ``x (r / s) + (-m / s)`` with its
    two rounded constants; Hugging Face: rescale, subtract, divide), each within ``3 u`` of the value
    scale ``(|x r| + |m|) / s <= (255 r + max |m|) / min s``: at most ``6 u`` of that apart."""
    mean, std = np.atleast_1d(settings["image_mean"]), np.atleast_1d(settings["image_std"])
    rescale = settings.get("rescale_factor", 1 / 255)
    return 6 * U32 * (255 * rescale + float(np.abs(mean).max())) / float(std.min())


#: 2.4e-6 for ImageNet's mean and std, 1.1e-6 for ViT's 0.5 and 0.5: below the 1e-5 the README promises.
TOLERANCE = normalisation_tolerance(CONVNEXT_BASE_PREPROCESSOR)
TOLERANCES = {family: normalisation_tolerance(settings) for family, settings in PREPROCESSORS.items()}


def read_as(processor_type: str, size, resample: int, crop_pct=None, crop_size=None, convert_rgb: bool = False) -> dict:
    return {
        "processor_type": processor_type,
        "size": size,
        "resample": resample,
        "crop_pct": crop_pct,
        "crop_size": crop_size,
        "convert_rgb": convert_rgb,
    }


#: What each family's processor is read as: the class AutoImageProcessor loads (the PIL backend,
#: torchvision not being installed) and the settings, written out here rather than derived.
CONVNEXT_224 = ("ConvNextImageProcessorPil", read_as("ConvNextImageProcessor", 224, 3, crop_pct=0.875))
EXPECTED = {
    "convnext": CONVNEXT_224,
    "convnextv2": CONVNEXT_224,
    "resnet": CONVNEXT_224,
    "vit": ("ViTImageProcessorPil", read_as("ViTImageProcessor", (224, 224), 2)),
    "dinov2": ("BitImageProcessorPil", read_as("BitImageProcessor", 256, 3, crop_size=(224, 224), convert_rgb=True)),
    "swin": ("ViTImageProcessorPil", read_as("ViTImageProcessor", (224, 224), 3)),
}


@dataclass(frozen=True)
class Family:
    """One family's processor: ours, Hugging Face's, the bound between them, where it was written."""

    name: str
    ours: ImagePreprocessor
    theirs: Any
    tolerance: float
    directory: str


def reference(processor, image: Image.Image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def max_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    return float((ours - theirs).abs().max())


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def mnist_digits(shared_dir: Path, count: int = 100) -> np.ndarray:
    raw = gzip.decompress((shared_dir / "data" / "mnist-t10k" / "t10k-images-idx3-ubyte.gz").read_bytes())
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:count]


def loaded(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


@pytest.fixture(scope="module")
def base(convnext_base_processor):
    """``(ours, Hugging Face)`` for facebook/convnext-base-224's processor config."""
    return ImagePreprocessor.from_pretrained(convnext_base_processor), AutoImageProcessor.from_pretrained(convnext_base_processor)


@pytest.fixture(scope="module", params=list(PREPROCESSORS))
def family(request, tmp_path_factory) -> Family:
    """Each family's processor (``conftest.PREPROCESSORS``), ours and Hugging Face's."""
    directory = write_preprocessor(tmp_path_factory.mktemp(request.param), PREPROCESSORS[request.param])
    ours, theirs = ImagePreprocessor.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory)
    return Family(request.param, ours, theirs, TOLERANCES[request.param], directory)


def test_settings_are_read_from_the_config(base):
    ours, _ = base
    assert ours.size == CONVNEXT_BASE_PREPROCESSOR["size"]
    assert ours.crop_pct == CONVNEXT_BASE_PREPROCESSOR["crop_pct"]
    assert ours.resample == Image.Resampling.BICUBIC
    assert ours.mean == tuple(CONVNEXT_BASE_PREPROCESSOR["image_mean"])
    assert ours.std == tuple(CONVNEXT_BASE_PREPROCESSOR["image_std"])
    assert ImagePreprocessor.from_processor(ours.to_processor()) == ours
    assert ours == ImagePreprocessor(), "the default is convnext-base-224's processor"


def test_each_familys_settings_are_read_and_exported_as_its_own_class(family, tmp_path):
    """Read as ``EXPECTED`` says; ``to_processor`` is the family's own class with the same settings:
    saved and loaded again (what ``pipeline()`` on an export does), it computes what the original does."""
    class_name, settings = EXPECTED[family.name]
    assert type(family.theirs).__name__ == class_name
    assert {key: getattr(family.ours, key) for key in settings} == settings
    assert family.ours.mean == tuple(PREPROCESSORS[family.name]["image_mean"])
    assert family.ours.std == tuple(PREPROCESSORS[family.name]["image_std"])
    assert family.ours.output_size == (224, 224)

    exported = family.ours.to_processor()
    assert type(exported) is type(family.theirs)
    assert ImagePreprocessor.from_processor(exported) == family.ours
    exported.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == settings["processor_type"]
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(family.theirs)
    image = random_image(300, 211, seed=7)
    assert torch.equal(reference(reloaded, image), reference(family.theirs, image))


def test_the_three_convnext_files_are_read_alike(tmp_path):
    # convnext-base-224 and resnet-50 have the legacy file, convnextv2 the current one: one processor.
    read = {
        name: ImagePreprocessor.from_pretrained(write_preprocessor(tmp_path / name, PREPROCESSORS[name]))
        for name in ("convnext", "convnextv2", "resnet")
    }
    assert read["convnext"] == read["convnextv2"] == read["resnet"]
    assert PREPROCESSOR_SOURCES["resnet"] == "microsoft/resnet-50"


def test_parity_on_real_dtd_jpegs(family, shared_dir):
    files = sorted((shared_dir / "data" / "dtd-10class-sample").glob("*/*.jpg"))
    assert len(files) == 40
    sizes = set()
    for file in files:
        image = loaded(file)
        sizes.add(image.size)
        output = family.ours(image)
        assert output.shape == (3, *family.ours.output_size)
        assert max_difference(output, reference(family.theirs, image)) <= family.tolerance, file.name
    assert any(width != height for width, height in sizes), "the sample should hold non-square images"


def test_parity_on_real_gtsrb_ppms(family, shared_dir):
    # 35 x 35 PPMs: every family upsamples them. Every fifth file of the 430 (86, two per class on average).
    files = sorted((shared_dir / "data" / "gtsrb-test-430").glob("*.ppm"))
    assert len(files) == 430
    for file in files[::5]:
        image = loaded(file)
        assert image.mode == "RGB"
        assert max_difference(family.ours(image), reference(family.theirs, image)) <= family.tolerance, file.name


def test_parity_on_real_grayscale_digits(family, shared_dir):
    # Grayscale is resized as one band and made RGB last: exactly the pixels of RGB first, with every filter.
    for digit in mnist_digits(shared_dir):
        image = Image.fromarray(digit, mode="L")
        assert torch.equal(family.ours.to_uint8_tensor(image), family.ours.to_uint8_tensor(image.convert("RGB")))
        assert max_difference(family.ours(image), reference(family.theirs, image.convert("RGB"))) <= family.tolerance


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_become_rgb(mode, family):
    image = random_image(150, 110, mode, seed=1)
    output = family.ours(image)
    assert output.shape == (3, 224, 224)
    assert torch.equal(output, family.ours(image.convert("RGB")))
    assert max_difference(output, reference(family.theirs, image.convert("RGB"))) <= family.tolerance
    if mode == "L" and len(set(family.ours.mean)) > 1:
        assert not torch.equal(output[0], output[1]), "channels must keep their own mean and std"


@pytest.mark.parametrize("size", [224, 32, 384])
def test_real_grayscale_digits_give_the_pixels_of_converting_first(size, shared_dir, tmp_path):
    # ConvNeXt's three branches: crop_pct resize and crop (224, 32), warp (384).
    directory = write_preprocessor(tmp_path / "processor", {**CONVNEXT_BASE_PREPROCESSOR, "size": size})
    ours, processor = ImagePreprocessor.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory)
    for digit in mnist_digits(shared_dir):
        image = Image.fromarray(digit, mode="L")
        assert torch.equal(ours.to_uint8_tensor(image), ours.to_uint8_tensor(image.convert("RGB")))
        assert max_difference(ours(image), reference(processor, image.convert("RGB"))) <= TOLERANCE


@pytest.mark.parametrize(("width", "height"), [(13, 29), (41, 17), (256, 300), (300, 256), (257, 256), (224, 224), (224, 301)])
def test_small_and_exact_sizes(width, height, family):
    # Upsampling non-square images, and the no-resize cases (ConvNeXt's and DINOv2's shorter side
    # already 256, ViT's image already 224 x 224).
    image = random_image(width, height, seed=width)
    assert max_difference(family.ours(image), reference(family.theirs, image)) <= family.tolerance


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


#: Settings beyond the hub checkpoints', each family's class: crops larger than the resized image
#: (the processor pads with black), odd offsets, non-square sizes, a second crop, every PIL filter.
GEOMETRIES = {
    "convnext crop_pct above 1 (pads)": ("convnext", {"crop_pct": 1.25}),
    "convnext with a second centre crop": (
        "convnextv2",
        {"do_center_crop": True, "crop_size": {"height": 201, "width": 180}, "resample": 1},
    ),
    "vit non-square, nearest": ("vit", {"size": {"height": 160, "width": 97}, "resample": 0}),
    "vit resized then cropped, box": ("vit", {"do_center_crop": True, "crop_size": {"height": 211, "width": 190}, "resample": 4}),
    "vit shortest edge then crop, hamming": (
        "vit",
        {"size": {"shortest_edge": 233}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "resample": 5},
    ),
    "bit odd sizes": ("dinov2", {"size": {"shortest_edge": 255}, "crop_size": {"height": 223, "width": 201}}),
    "bit crop wider than the resize (pads)": (
        "dinov2",
        {"size": {"height": 240, "width": 200}, "crop_size": {"height": 224, "width": 231}, "resample": 2},
    ),
}


@pytest.mark.parametrize("case", GEOMETRIES)
def test_other_geometries_and_filters_match_the_processor(case, tmp_path):
    name, overrides = GEOMETRIES[case]
    settings = {**PREPROCESSORS[name], **overrides}
    directory = write_preprocessor(tmp_path / "processor", settings)
    ours, processor = ImagePreprocessor.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory)
    assert ours.resample == settings["resample"]
    for width, height in [(13, 29), (41, 17), (300, 256), (333, 500), (201, 223)]:
        image = random_image(width, height, seed=width + height)
        output = ours(image)
        assert output.shape == (3, *ours.output_size)
        assert max_difference(output, reference(processor, image)) <= normalisation_tolerance(settings), (width, height)
    assert ImagePreprocessor.from_processor(ours.to_processor()) == ours


def test_missing_processor_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_processor(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no preprocessor_config.json"):
        load_image_processor(str(tmp_path / "empty"))


# --- processors and settings that cannot be reproduced: one DataError each ----------------------

UNSUPPORTED = {
    "no resize": ("vit", {"do_resize": False}, "do_resize false is not supported"),
    "no rescale": ("dinov2", {"do_rescale": False}, "do_rescale false is not supported"),
    "no normalisation": ("convnextv2", {"do_normalize": False}, "do_normalize false is not supported"),
    "padding": ("dinov2", {"do_pad": True, "pad_size": {"height": 300, "width": 300}}, "do_pad true is not supported"),
    "an unknown resample": ("vit", {"resample": 99}, "resample 99 is not one of PIL's filters"),
    "a torchvision resample name": ("vit", {"resample": "bilinear"}, "resample 'bilinear' is not one of PIL's filters"),
    "convnext with height and width": (
        "convnext",
        {"size": {"height": 224, "width": 224}},
        "size {'height': 224, 'width': 224} is not supported (only {'shortest_edge'})",
    ),
    "a longest edge": (
        "dinov2",
        {"size": {"shortest_edge": 256, "longest_edge": 512}},
        "size {'longest_edge': 512, 'shortest_edge': 256} is not supported (only {'shortest_edge'} or {'height', 'width'})",
    ),
    "a maximum size": (
        "vit",
        {"size": {"max_height": 224, "max_width": 224}},
        "size {'max_height': 224, 'max_width': 224} is not",
    ),
    "a shortest edge without a crop": (
        "vit",
        {"size": {"shortest_edge": 224}},
        "size {'shortest_edge': 224} without a centre crop gives every image its own size",
    ),
    "a crop of one side": (
        "dinov2",
        {"crop_size": {"shortest_edge": 224}},
        "do_center_crop needs a crop_size {'height', 'width'}, got {'shortest_edge': 224}",
    ),
    "two means": ("dinov2", {"image_mean": [0.5, 0.5]}, "image_mean has 2 values, not one per RGB channel"),
    "another class": (
        "convnextv2",
        {"image_processor_type": "CLIPImageProcessor"},
        "its class is none of ConvNextImageProcessor, ViTImageProcessor, BitImageProcessor",
    ),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_a_processor_that_cannot_be_reproduced_is_one_data_error(case, tmp_path):
    name, overrides, problem = UNSUPPORTED[case]
    class_name = overrides["image_processor_type"] + "Pil" if "image_processor_type" in overrides else EXPECTED[name][0]
    directory = write_preprocessor(tmp_path / "processor", {**PREPROCESSORS[name], **overrides})
    processor = AutoImageProcessor.from_pretrained(directory)  # Hugging Face loads it: the refusal is ours
    for load in (ImagePreprocessor.from_pretrained, load_image_processor):  # the DataModules load with the latter
        with pytest.raises(
            DataError, match=rf"^the image processor '{directory}' \({class_name}\) cannot be reproduced: "
        ) as error:
            load(directory)
        assert problem in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError, match=rf"^the image processor {class_name} cannot be reproduced: "):
        ImagePreprocessor.from_processor(processor)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"size": (224, 224)}, "ConvNextImageProcessor needs an int size"),
        ({"processor_type": "ViTImageProcessor", "size": (224, 224)}, "crop_pct is ConvNextImageProcessor's setting"),
        ({"processor_type": "DeiTImageProcessor", "crop_pct": None}, "processor_type must be one of"),
        ({"resample": 42}, "resample 42 is not one of PIL's filters"),
        ({"std": (0.2, 0.0, 0.2)}, "std positive"),
        ({"crop_size": (224, 0)}, "crop_size must be a positive (height, width)"),
    ],
)
def test_settings_no_processor_has_are_refused(settings, problem):
    with pytest.raises(DataError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        ImagePreprocessor(**settings)


def test_an_unreproducible_processor_is_one_error_line_of_the_cli(convnext, tmp_path_factory, quiet_cli, capsys):
    inputs = tmp_path_factory.mktemp("inputs")
    processor = write_preprocessor(inputs / "processor", {**PREPROCESSORS["vit"], "do_resize": False})
    data = write_dataset(small_dataset("mnist"), inputs / "mnist", "disk")
    line = one_error_line(train_main, train_args(convnext, data, "mnist", f"--data.processor={processor}"), capsys)
    assert line.startswith(
        f"error: the image processor '{processor}' (ViTImageProcessorPil) cannot be reproduced: do_resize false"
    ), line
    assert not list(quiet_cli.iterdir()), "nothing written"


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


def test_every_readable_mode_is_read_as_the_pipeline_reads_it(family):
    """``pipeline("image-classification")`` runs ``load_image`` (``convert("RGB")``: alpha dropped, not
    composited on white; a palette's transparent colour kept as ``info["transparency"]``) and then the
    processor (DINOv2's ``do_convert_rgb`` makes that colour white)."""
    images = mode_images()
    assert {image.mode for image in images.values()} == set(READABLE_MODES), "a mode without a test"
    for name, image in images.items():
        assert max_difference(family.ours(image), reference(family.theirs, load_image(image))) <= family.tolerance, name


@pytest.mark.parametrize("mode", ["P", "L", "RGB"])
def test_do_convert_rgb_makes_the_transparent_colour_white(mode, family):
    # A PNG's one transparent colour (tRNS): convert("RGB") keeps it in info, do_convert_rgb composites it.
    image = Image.new(mode, (60, 40), {"P": 5, "L": 90, "RGB": (20, 90, 200)}[mode])
    if mode == "P":
        image.putpalette([value for index in range(256) for value in (index, 90, 255 - index)])
    image.info["transparency"] = image.getpixel((0, 0))
    crop = family.ours.to_uint8_tensor(image)
    colour = torch.tensor(image.convert("RGB").getpixel((0, 0)), dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(crop, torch.full_like(crop, 255) if family.ours.convert_rgb else colour.expand_as(crop))
    assert max_difference(family.ours(image), reference(family.theirs, load_image(image))) <= family.tolerance


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
