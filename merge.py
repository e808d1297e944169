"""Merge fine-tuned backbones (ConvNeXt, or a pool of another one family) and evaluate the merged model on every task.

    python merge.py test --config configs/merge/convnext-base-224_8-tasks.yaml
    python merge.py test --config configs/merge/convnext-base-224_8-tasks.yaml \
        --model.method TiesMerging --model.method.top_k 0.2 --model.method.scaling_factor 0.3
    python merge.py test --config configs/quickstart/merge.yaml
    python merge.py --help
"""

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType

import merging  # noqa: F401  (the merge methods, selectable as --model.method <Name>)
from datamodules import MultiTaskDataModule
from lightning_modules.adamerging import AdaMerging  # noqa: F401  (model classes for --model <Name>)
from lightning_modules.cli import MergeCLI
from lightning_modules.comparison import MethodComparison  # noqa: F401
from lightning_modules.merged import MergedClassifier  # noqa: F401


def main(args: ArgsType = None) -> None:
    MergeCLI(
        LightningModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        args=args,
        parser_kwargs={"description": __doc__.splitlines()[0]},
        trainer_defaults={"use_distributed_sampler": False},
    )


if __name__ == "__main__":
    main()
