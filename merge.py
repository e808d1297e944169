"""Merge fine-tuned ConvNeXt backbones and evaluate the merged model on every task.

    python merge.py test --config configs/merge/convnext-base-224_8-tasks.yaml
    python merge.py test --config configs/merge/convnext-base-224_8-tasks.yaml \
        --model.method TiesMerging --model.method.top_k 0.2 --model.method.scaling_factor 0.3
    python merge.py test --config configs/quickstart/merge.yaml
    python merge.py --help
"""

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType

import merging.methods  # noqa: F401  (registers the merge methods for --model.method)
from datamodules import MultiTaskDataModule
from lightning_modules.cli import MergeCLI
from lightning_modules.merged import MergedClassifier  # noqa: F401  (the default model class)


def main(args: ArgsType = None) -> None:
    MergeCLI(
        LightningModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        args=args,
        trainer_defaults={"use_distributed_sampler": False},
    )


if __name__ == "__main__":
    main()
