"""ConvNeXt image preprocessing with the Hugging Face processor's exact semantics, faster.

The processor (``ConvNextImageProcessor``) turns a PIL image into a NumPy array, back into
a PIL image to resize it, crops in NumPy and normalises in float64. Here the image stays
in PIL until it is cropped, and the normalisation is one fused float32 operation in torch.
Parity with the processor is tested on real JPEGs (``tests/test_preprocessing.py``) and the
speed-up is measured in ``benchmarks/preprocessing.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.errors import DataError
from datamodules.images import check_image_mode

#: ``crop_pct`` only applies below this size; at or above it the processor warps to a square.
_CROP_PCT_MAX_SIZE = 384


def load_image_processor(name_or_path: str) -> Any:
    """A model's Hugging Face image processor (hub id or local directory), with one clear error."""
    from transformers import AutoImageProcessor

    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not local.exists():
        raise DataError(f"image processor path '{name_or_path}' does not exist")
    if local.is_dir() and not (local / "preprocessor_config.json").is_file():
        raise DataError(f"image processor path '{name_or_path}' has no preprocessor_config.json")
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except Exception as error:  # hub or parse failure: one line naming the source
        raise DataError(f"cannot load the image processor '{name_or_path}': {type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize, centre-crop and normalise like ``ConvNextImageProcessor``.

    Args:
        size: output side (the processor's ``size["shortest_edge"]``).
        crop_pct: below 384 the shorter side is first resized to ``int(size / crop_pct)``.
        resample: PIL resampling filter (3 = bicubic).
        mean: per-channel mean, after rescaling to [0, 1].
        std: per-channel standard deviation.
        rescale_factor: multiplier that takes uint8 pixels to [0, 1].
    """

    size: int = 224
    crop_pct: float = 0.875
    resample: int = Image.Resampling.BICUBIC
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> ImagePreprocessor:
        """Read the settings of a model's image processor (hub id or local directory)."""
        return cls.from_processor(load_image_processor(name_or_path))

    @classmethod
    def from_processor(cls, processor) -> ImagePreprocessor:
        """Take the settings of a loaded ``ConvNextImageProcessor`` (either backend)."""
        size = processor.size
        shortest_edge = size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge
        if not shortest_edge:
            raise ValueError(f"image processor size {dict(size)} has no 'shortest_edge'")
        return cls(
            size=int(shortest_edge),
            crop_pct=float(getattr(processor, "crop_pct", None) or 224 / 256),
            resample=int(processor.resample),
            mean=tuple(float(m) for m in processor.image_mean),
            std=tuple(float(s) for s in processor.image_std),
            rescale_factor=float(processor.rescale_factor),
        )

    def to_processor(self):
        """The equivalent Hugging Face processor, saved beside exported checkpoints."""
        from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

        return ConvNextImageProcessorPil(
            size={"shortest_edge": self.size},
            crop_pct=self.crop_pct,
            resample=self.resample,
            image_mean=list(self.mean),
            image_std=list(self.std),
            rescale_factor=self.rescale_factor,
        )

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """Resize (shorter side to ``int(size / crop_pct)``) and centre-crop; returns RGB.

        Any other mode is made RGB first, as the Hugging Face pipeline makes it (``convert("RGB")``);
        one that conversion would clip (16-bit, 32-bit, float pixels) is refused with a ``DataError``
        (``datamodules.images.mode_problem``). A grayscale image is resized and cropped as its one
        band and made RGB last: the same pixels as converting first (each RGB band is that band,
        resampled alike), a third of the work (MNIST at 224 px: 0.26 instead of 0.43 ms per image)."""
        if image.mode not in ("RGB", "L"):
            check_image_mode(image)
            image = image.convert("RGB")
        image = self._resize_and_crop(image)
        return image if image.mode == "RGB" else image.convert("RGB")

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.size >= _CROP_PCT_MAX_SIZE:
            return image.resize((self.size, self.size), resample=self.resample)
        short_target = int(self.size / self.crop_pct)
        # Same rounding as transformers.image_transforms.get_resize_output_image_size.
        if width <= height:
            new_width, new_height = short_target, int(short_target * height / width)
        else:
            new_width, new_height = int(short_target * width / height), short_target
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), resample=self.resample)
        top = (new_height - self.size) // 2
        left = (new_width - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def to_uint8_tensor(self, image: Image.Image) -> torch.Tensor:
        """The cropped RGB image as a ``(3, size, size)`` uint8 tensor."""
        array = np.array(self.resize_and_crop(image))  # a writable copy torch can own
        return torch.from_numpy(array).permute(2, 0, 1)

    def __post_init__(self) -> None:
        # x * (r / std) - mean / std == (x * r - mean) / std, as one addcmul per pixel.
        scale = torch.tensor([self.rescale_factor / s for s in self.std]).view(3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(3, 1, 1)
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_shift", shift)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, H, W)`` to normalised float32, in one pass into a contiguous tensor."""
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return torch.addcmul(self._shift, pixels, self._scale, out=out)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode ``resize_and_crop`` reads) to the ``(3, size, size)`` float32 model input."""
        return self.normalize(self.to_uint8_tensor(image))
