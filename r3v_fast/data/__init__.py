"""The data layer: records, dataset loaders, the shapes-math task, answer judges and prompts.

Everything the R³V loop reads and writes about questions and answers; this layer imports
nothing else of r3v_fast. See docs/architecture.md and each module's docstring.
"""

from .judge import extract_answer, is_correct
from .loaders import load_dataset
from .records import DataError, LoadReport, Record, read_records, write_records

__all__ = ["DataError", "LoadReport", "Record", "read_records", "write_records", "load_dataset",
           "extract_answer", "is_correct"]
