"""Image preprocessing with the Hugging Face image processors' exact semantics, faster.

Three processor classes cover the project's families: ``ConvNextImageProcessor`` (ConvNeXt,
ConvNeXt-V2, ResNet: the shorter side to ``int(size / crop_pct)``, a centre crop of ``size``;
at 384 px and above a warp to ``size`` x ``size``), ``ViTImageProcessor`` (ViT, Swin: a warp to
``height`` x ``width``) and ``BitImageProcessor`` (DINOv2: the shorter side to ``shortest_edge``,
a centre crop of ``crop_size``, and ``do_convert_rgb``). Their PIL backend turns a PIL image
into a NumPy array, back into a PIL image to resize it, crops in NumPy and normalises in float64.
Here the image stays in PIL until it is cropped (the same resize call, the same crop offsets),
and the normalisation is one fused float32 operation in torch. A setting none of them has, or
one of theirs this class does not reproduce, is refused (``DataError``), never approximated.
Parity with each processor is tested on real images (``tests/test_preprocessing.py``) and the
speed-up is measured in ``benchmarks/preprocessing.py``.

The pixels are the PIL backend's (``...ImageProcessorPil``), which ``AutoImageProcessor`` loads
where torchvision is not installed (the project does not depend on it) and ``load_image_processor``
loads always; the torchvision backend has the same settings but resamples with torch's
antialiased interpolation, whose pixels are not PIL's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.errors import DataError
from datamodules.images import check_image_mode

CONVNEXT = "ConvNextImageProcessor"
VIT = "ViTImageProcessor"
BIT = "BitImageProcessor"
#: The Hugging Face image processor classes reproduced (either backend: ``<name>Pil`` is the PIL one).
PROCESSOR_TYPES = (CONVNEXT, VIT, BIT)

#: ``crop_pct`` only applies below this size; at or above it ConvNextImageProcessor warps to a square.
_CROP_PCT_MAX_SIZE = 384

#: PIL's resampling filters (``Image.Resampling``: 2 bilinear, 3 bicubic, ...): each processor passes
#: its ``resample`` to PIL's ``resize`` as it is, and so does this class.
_RESAMPLE_FILTERS = frozenset(int(f) for f in Image.Resampling)


def load_image_processor(name_or_path: str) -> Any:
    """A model's Hugging Face image processor (hub id or local directory), with one clear error.

    Its PIL backend (``backend="pil"``): the one ``ImagePreprocessor`` reproduces pixel for pixel;
    one it cannot reproduce is refused here, where the message can name the source."""
    processor = _load(name_or_path)
    ImagePreprocessor.from_processor(processor, source=name_or_path)
    return processor


def _load(name_or_path: str) -> Any:
    from transformers import AutoImageProcessor

    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not local.exists():
        raise DataError(f"image processor path '{name_or_path}' does not exist")
    if local.is_dir() and not (local / "preprocessor_config.json").is_file():
        raise DataError(f"image processor path '{name_or_path}' has no preprocessor_config.json")
    try:
        return AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    except Exception as error:  # hub or parse failure: one line naming the source
        raise DataError(f"cannot load the image processor '{name_or_path}': {type(error).__name__}: {error}") from error


def _processor_type(processor: Any) -> str:
    """The processor's class as its ``image_processor_type`` names it (``ViTImageProcessorPil``: ``ViTImageProcessor``)."""
    name = type(processor).__name__
    for suffix in ("Pil", "Fast"):
        if name.endswith(suffix) and name[: -len(suffix)] in PROCESSOR_TYPES:
            return name[: -len(suffix)]
    return name


def _size_entries(size: Any) -> dict[str, int] | None:
    """A ``size`` or ``crop_size`` (dict or ``SizeDict``) as a dict of its set entries, or None."""
    if isinstance(size, Mapping):
        return {key: value for key, value in size.items() if value is not None}
    try:
        return dict(size)  # SizeDict iterates over its set entries
    except (TypeError, ValueError):
        return None


def _channels(values: Any, name: str) -> tuple[float, float, float]:
    """``image_mean`` or ``image_std`` as three floats (one number is every channel's, as the processor reads it)."""
    if isinstance(values, (int, float)):
        values = [values] * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} has {len(values)} values, not one per RGB channel")
    return values


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize, centre-crop and normalise like a Hugging Face image processor's PIL backend.

    The default is facebook/convnext-base-224's processor.

    Args:
        size: the processor's ``size``: an int is ``{"shortest_edge": n}`` (the shorter side is
            resized to ``n``, the aspect ratio kept, the longer side rounded down), a pair is
            ``{"height": h, "width": w}`` (resized to exactly that).
        crop_pct: ``ConvNextImageProcessor``'s: below 384 px the shorter side is resized to
            ``int(size / crop_pct)`` and centre-cropped to ``size`` x ``size``; None for the others.
        crop_size: ``(height, width)`` of the centre crop that follows (``do_center_crop``), or
            None; a crop larger than the image pads it with black, as the processor does.
        resample: PIL resampling filter (2 = bilinear, 3 = bicubic).
        mean: per-channel mean, after rescaling to [0, 1].
        std: per-channel standard deviation.
        rescale_factor: multiplier that takes uint8 pixels to [0, 1].
        convert_rgb: the processor's ``do_convert_rgb``: a colour marked transparent
            (``info["transparency"]``, kept by ``convert("RGB")``) is composited onto white.
        processor_type: the Hugging Face class reproduced (one of ``PROCESSOR_TYPES``).
    """

    size: int | tuple[int, int] = 224
    crop_pct: float | None = 0.875
    crop_size: tuple[int, int] | None = None
    resample: int = Image.Resampling.BICUBIC
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rescale_factor: float = 1 / 255
    convert_rgb: bool = False
    processor_type: str = CONVNEXT

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> ImagePreprocessor:
        """Read the settings of a model's image processor (hub id or local directory)."""
        return cls.from_processor(_load(name_or_path), source=name_or_path)

    @classmethod
    def from_processor(cls, processor: Any, source: str | None = None) -> ImagePreprocessor:
        """Take the settings of a loaded ``ConvNextImageProcessor``, ``ViTImageProcessor`` or
        ``BitImageProcessor`` (either backend: the pixels are the PIL backend's).

        Args:
            processor: the loaded Hugging Face image processor.
            source: where it was loaded from, for the error message.

        Raises:
            DataError: another class, or a setting this class does not reproduce, named.
        """
        name = type(processor).__name__
        try:
            return cls._from_settings(processor, _processor_type(processor))
        except ValueError as problem:  # DataError is one: a setting refused here or in __post_init__
            where = f"'{source}' ({name})" if source else name
            raise DataError(f"the image processor {where} cannot be reproduced: {problem}") from None

    @classmethod
    def _from_settings(cls, processor: Any, processor_type: str) -> ImagePreprocessor:
        if processor_type not in PROCESSOR_TYPES:
            raise ValueError(f"its class is none of {', '.join(PROCESSOR_TYPES)} (nor their 'Pil' PIL backends)")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if not getattr(processor, flag, None):
                raise ValueError(f"{flag} false is not supported (every image is resized, rescaled and normalised)")
        if getattr(processor, "do_pad", None):
            raise ValueError("do_pad true is not supported")
        resample = getattr(processor, "resample", None)
        if isinstance(resample, bool) or not isinstance(resample, int) or int(resample) not in _RESAMPLE_FILTERS:
            raise ValueError(f"resample {resample!r} is not one of PIL's filters {sorted(_RESAMPLE_FILTERS)}")
        size = cls._read_size(processor.size, processor_type)
        crop_size = None
        if getattr(processor, "do_center_crop", None):
            crop = _size_entries(processor.crop_size) if processor.crop_size is not None else None
            if crop is None or set(crop) != {"height", "width"}:
                shown = processor.crop_size if crop is None else crop
                raise ValueError(f"do_center_crop needs a crop_size {{'height', 'width'}}, got {shown!r}")
            crop_size = (int(crop["height"]), int(crop["width"]))
        crop_pct = None
        if processor_type == CONVNEXT:
            crop_pct = float(getattr(processor, "crop_pct", None) or 224 / 256)  # None: the class default
        return cls(
            size=size,
            crop_pct=crop_pct,
            crop_size=crop_size,
            resample=int(resample),
            mean=_channels(processor.image_mean, "image_mean"),
            std=_channels(processor.image_std, "image_std"),
            rescale_factor=float(processor.rescale_factor),
            convert_rgb=bool(getattr(processor, "do_convert_rgb", None)),
            processor_type=processor_type,
        )

    @staticmethod
    def _read_size(size: Any, processor_type: str) -> int | tuple[int, int]:
        entries = _size_entries(size)
        keys = set(entries) if entries is not None else None
        if keys == {"shortest_edge"}:
            return int(entries["shortest_edge"])
        if keys == {"height", "width"} and processor_type != CONVNEXT:  # ConvNeXt's resize refuses it too
            return int(entries["height"]), int(entries["width"])
        known = "{'shortest_edge'}" if processor_type == CONVNEXT else "{'shortest_edge'} or {'height', 'width'}"
        raise ValueError(f"size {entries if entries is not None else size!r} is not supported (only {known})")

    def to_processor(self) -> Any:
        """The equivalent Hugging Face processor (its PIL backend), saved beside exported
        checkpoints: ``save_pretrained`` writes it as ``processor_type``, so ``pipeline()`` on
        the export loads the family's own class with these settings."""
        import transformers

        settings = {
            "size": {"shortest_edge": self.size} if isinstance(self.size, int) else dict(zip(("height", "width"), self.size)),
            "resample": self.resample,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "rescale_factor": self.rescale_factor,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_center_crop": self.crop_size is not None,
            "do_convert_rgb": self.convert_rgb,
        }
        if self.crop_size is not None:
            settings["crop_size"] = dict(zip(("height", "width"), self.crop_size))
        if self.processor_type == CONVNEXT:
            settings["crop_pct"] = self.crop_pct
        return getattr(transformers, f"{self.processor_type}Pil")(**settings)

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of every preprocessed image."""
        if self.crop_size is not None:
            return self.crop_size
        if isinstance(self.size, tuple):
            return self.size
        return self.size, self.size  # ConvNeXt's crop or warp (__post_init__ refuses the other cases)

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """Resize and centre-crop as the processor does; returns RGB.

        Any other mode is made RGB first, as the Hugging Face pipeline makes it (``convert("RGB")``);
        one that conversion would clip (16-bit, 32-bit, float pixels) is refused with a ``DataError``
        (``datamodules.images.mode_problem``). A grayscale image is resized and cropped as its one
        band and made RGB last: the same pixels as converting first (each RGB band is that band,
        resampled alike), a third of the work (MNIST at 224 px: 0.26 instead of 0.43 ms per image).
        With ``convert_rgb``, a colour marked transparent becomes white first, as the processor's
        ``do_convert_rgb`` makes it (``transformers.image_transforms.convert_to_rgb``)."""
        if image.mode not in ("RGB", "L"):
            check_image_mode(image)
            image = image.convert("RGB")
        if self.convert_rgb and image.info.get("transparency") is not None:
            image = image.convert("RGBA")  # the transparent colour's alpha is 0, every other's 255
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
        image = self._resize_and_crop(image)
        return image if image.mode == "RGB" else image.convert("RGB")

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        if self.processor_type == CONVNEXT:
            if self.size >= _CROP_PCT_MAX_SIZE:
                image = self._resize(image, (self.size, self.size))
            else:
                image = self._resize(image, self._shorter_side_to(image, int(self.size / self.crop_pct)))
                image = self._center_crop(image, (self.size, self.size))
        elif isinstance(self.size, int):
            image = self._resize(image, self._shorter_side_to(image, self.size))
        else:
            image = self._resize(image, self.size)
        return image if self.crop_size is None else self._center_crop(image, self.crop_size)

    @staticmethod
    def _shorter_side_to(image: Image.Image, target: int) -> tuple[int, int]:
        """``(height, width)`` with the shorter side ``target``: the same rounding (down) as
        ``transformers.image_transforms.get_resize_output_image_size``."""
        width, height = image.size
        if width <= height:
            return int(target * height / width), target
        return target, int(target * width / height)

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        height, width = size
        if (width, height) == image.size:  # PIL's resize returns a copy then: skip it
            return image
        return image.resize((width, height), resample=self.resample)

    @staticmethod
    def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """``transformers.image_transforms.center_crop``: offsets rounded down; where the crop is
        larger than the image, the image sits at ``ceil`` of half the excess in black (PIL's
        crop fills outside the image with 0 at exactly those offsets)."""
        height, width = size
        top = (image.height - height) // 2
        left = (image.width - width) // 2
        if (left, top, width, height) == (0, 0, image.width, image.height):
            return image
        return image.crop((left, top, left + width, top + height))

    def to_uint8_array(self, image: Image.Image) -> np.ndarray:
        """The cropped RGB image as a ``(height, width, 3)`` uint8 array: the pixels
        ``to_uint8_tensor`` views, and what the crop cache (``datamodules.crop_cache``) stores."""
        return np.array(self.resize_and_crop(image))  # a writable copy torch can own

    @staticmethod
    def array_to_tensor(array: np.ndarray) -> torch.Tensor:
        """A ``(height, width, 3)`` uint8 crop as the ``(3, height, width)`` tensor ``normalize``
        takes: a view with the same strides whether the crop was just made or read from the cache,
        so that ``normalize`` runs the very same computation on both."""
        return torch.from_numpy(array).permute(2, 0, 1)

    def to_uint8_tensor(self, image: Image.Image) -> torch.Tensor:
        """The cropped RGB image as a ``(3, height, width)`` uint8 tensor."""
        return self.array_to_tensor(self.to_uint8_array(image))

    @property
    def pixel_settings(self) -> dict[str, Any]:
        """Every setting that changes the uint8 crop (not ``mean``, ``std`` or ``rescale_factor``,
        which ``normalize`` applies after it): part of the crop cache's key."""
        return {
            "processor_type": self.processor_type,
            "size": list(self.size) if isinstance(self.size, tuple) else self.size,
            "crop_pct": self.crop_pct,
            "crop_size": list(self.crop_size) if self.crop_size is not None else None,
            "resample": int(self.resample),
            "convert_rgb": self.convert_rgb,
        }

    def __post_init__(self) -> None:
        self._check()
        # x * (r / std) - mean / std == (x * r - mean) / std, as one addcmul per pixel.
        scale = torch.tensor([self.rescale_factor / s for s in self.std]).view(3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_shift", shift)

    def _check(self) -> None:
        """Refuse settings no processor reproduced here has (``DataError``)."""
        if self.processor_type not in PROCESSOR_TYPES:
            raise DataError(f"processor_type must be one of {', '.join(PROCESSOR_TYPES)}, got {self.processor_type!r}")
        sides = [self.size] if isinstance(self.size, int) else list(self.size)
        if len(sides) not in (1, 2) or not all(isinstance(side, int) and side > 0 for side in sides):
            raise DataError(f"size must be a positive shortest edge or (height, width), got {self.size!r}")
        if self.crop_size is not None and (len(self.crop_size) != 2 or min(self.crop_size) <= 0):
            raise DataError(f"crop_size must be a positive (height, width), got {self.crop_size!r}")
        if (self.processor_type == CONVNEXT) != (self.crop_pct is not None):
            raise DataError(
                f"crop_pct is {CONVNEXT}'s setting (and it needs one), got {self.crop_pct!r} for {self.processor_type}"
            )
        if self.processor_type == CONVNEXT and (not isinstance(self.size, int) or not self.crop_pct > 0):
            raise DataError(
                f"{CONVNEXT} needs an int size (its shortest edge) and crop_pct > 0, got {self.size!r}, {self.crop_pct!r}"
            )
        if self.processor_type != CONVNEXT and isinstance(self.size, int) and self.crop_size is None:
            raise DataError(
                f"size {{'shortest_edge': {self.size}}} without a centre crop gives every image its own size "
                "(the model's inputs are batched): a crop_size is needed"
            )
        if self.resample not in _RESAMPLE_FILTERS:
            raise DataError(f"resample {self.resample!r} is not one of PIL's filters {sorted(_RESAMPLE_FILTERS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(f"mean and std need three values, std positive, got {self.mean!r}, {self.std!r}")

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, H, W)`` to normalised float32, in one pass into a contiguous tensor."""
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return torch.addcmul(self._shift, pixels, self._scale, out=out)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode ``resize_and_crop`` reads) to the ``(3, height, width)`` float32 model input."""
        return self.normalize(self.to_uint8_tensor(image))
