"""Training data: files and formats to token examples, packing, collating.

The path of a run: :func:`build_datasets` reads a file (:mod:`.files`), turns its rows into token
examples with labels (:mod:`.formats`, :mod:`.tokens`), splits off validation, packs
(:mod:`.packing`), and the Trainer batches them with :class:`DataCollator` (:mod:`.collate`).
"""

from .batch_packing import BatchPackingCollator
from .collate import DataCollator, LabelsAndTuplesCollator, pad_token_id_for
from .datasets import build_datasets, split_validation
from .files import check_data_file, default_data_path
from .formats import FORMATS, detect_format, load_examples
from .packing import pack_examples, supports_packing
from .records import IGNORE_INDEX, DataReport, Example

__all__ = [
    "FORMATS", "IGNORE_INDEX", "BatchPackingCollator", "DataCollator", "DataReport", "Example",
    "LabelsAndTuplesCollator", "build_datasets", "check_data_file", "default_data_path", "detect_format",
    "load_examples", "pack_examples", "pad_token_id_for", "split_validation", "supports_packing",
]
