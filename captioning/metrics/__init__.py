"""Caption metrics: pycocoevalcap scorers called directly (offline) and n-best diversity metrics.

Metric functions return plain names ("BLEU-4", "CIDEr", ...); callers prefix `split/`.
"""

from captioning.metrics.coco import (
    close_meteor,
    load_references,
    load_results,
    ptb_tokenize,
    ptb_tokenize_lines,
    score_captions,
)
from captioning.metrics.diversity import (
    distinct_n,
    diversity_report,
    diversity_report_tokenized,
    oracle_scores,
    self_bleu4,
    unique_ngram_ratio,
)
from captioning.metrics.java import check_java

__all__ = [
    "check_java",
    "close_meteor",
    "distinct_n",
    "unique_ngram_ratio",
    "diversity_report",
    "diversity_report_tokenized",
    "load_references",
    "load_results",
    "oracle_scores",
    "score_captions",
    "self_bleu4",
    "ptb_tokenize",
    "ptb_tokenize_lines",
]
