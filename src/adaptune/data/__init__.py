"""Training data: sources and formats to token examples, mixtures, packing, collating, streaming.

The path of a run: :func:`build_datasets` reads each source (:mod:`.sources`: local files, saved
datasets, hub ids), turns its rows into token examples with labels (:mod:`.formats`, :mod:`.chat`,
:mod:`.tokens`), through the tokenization cache if asked (:mod:`.cache`), splits off validation,
mixes several sources by weight (:mod:`.mixture`), packs (:mod:`.packing`), and the Trainer batches
them with :class:`DataCollator` (:mod:`.collate`). Data larger than memory is read, tokenized and
packed on the fly instead (:mod:`.streaming`).
"""

from .batch_packing import BatchPackingCollator
from .cache import cached_examples, default_cache_dir
from .collate import DataCollator, LabelsAndTuplesCollator, pad_token_id_for
from .datasets import build_datasets, split_validation
from .files import check_data_file, default_data_path
from .formats import FORMATS, detect_format, load_examples
from .packing import pack_examples, supports_packing
from .records import IGNORE_INDEX, DataReport, Example, MixtureReport
from .sources import DataSource, parse_columns, parse_sources
from .streaming import StreamedDataset, build_streaming

__all__ = [
    "FORMATS", "IGNORE_INDEX", "BatchPackingCollator", "DataCollator", "DataReport", "DataSource", "Example",
    "LabelsAndTuplesCollator", "MixtureReport", "StreamedDataset", "build_datasets", "build_streaming",
    "cached_examples", "check_data_file", "default_cache_dir", "default_data_path", "detect_format",
    "load_examples", "pack_examples", "pad_token_id_for", "parse_columns", "parse_sources", "split_validation",
    "supports_packing",
]
