"""Fine-tune an image classifier (ConvNeXt by default; ResNet, ViT, DINOv2, ... with
``--model.model_name_or_path`` and ``--data.processor``) on one task and export it in Hugging Face format.

python train.py fit --config configs/train/dtd.yaml
python train.py fit --config configs/quickstart/digits.yaml
python train.py --help
"""

from lightning.pytorch.cli import ArgsType

from datamodules import ImageClassificationDataModule
from lightning_modules.classifier import ImageClassifier
from lightning_modules.cli import TrainCLI


def main(args: ArgsType = None) -> None:
    TrainCLI(
        ImageClassifier,
        ImageClassificationDataModule,
        args=args,
        parser_kwargs={"description": __doc__.splitlines()[0]},
        trainer_defaults={"use_distributed_sampler": False},
    )


if __name__ == "__main__":
    main()
