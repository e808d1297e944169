"""LightningDataModules for the registry's 24 hub tasks (the TA8, TALL14 and TALL20 benchmarks and four
more) and the offline quickstart tasks.

from datamodules import ImageClassificationDataModule, MultiTaskDataModule, TASKS
data = ImageClassificationDataModule("dtd", path="/data/dtd", processor="facebook/convnext-base-224", batch_size=64)
data.num_classes, data.classnames[:3]
"""

from datamodules.classification import ImageClassificationDataModule, split_train_val
from datamodules.errors import DataError
from datamodules.multitask import MultiTaskDataModule
from datamodules.preprocessing import ImagePreprocessor, load_image_processor
from datamodules.tasks import (
    BENCHMARK_TASKS,
    BENCHMARKS,
    FUSIONBENCH_TASKS,
    QUICKSTART_TASKS,
    TASKS,
    TaskInfo,
    get_benchmark,
    get_task,
)

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_TASKS",
    "FUSIONBENCH_TASKS",
    "QUICKSTART_TASKS",
    "TASKS",
    "DataError",
    "ImageClassificationDataModule",
    "ImagePreprocessor",
    "MultiTaskDataModule",
    "TaskInfo",
    "get_benchmark",
    "get_task",
    "load_image_processor",
    "split_train_val",
]
