"""Diversity of n-best caption lists (beam / diverse beam search) and oracle scores over them.

Everything here works on PTB-tokenized strings (tokens joined by spaces), the form pycocoevalcap's
scorers see. `diversity_report` takes raw captions and tokenizes them once (one JVM call);
`diversity_report_tokenized` is the pure-Python core for callers that already tokenized.

Metrics (all over the first k captions of every image's n-best list):
  distinct-n        number of distinct n-grams / total number of words, pooled over all captions of all
                    images (n = 1, 2). This is distinct-n as Li et al. 2016 define it ("A Diversity-Promoting
                    Objective Function for Neural Conversation Models": distinct n-grams scaled by the
                    total number of generated tokens), the definition Vijayakumar et al. 2018 (Diverse
                    Beam Search) follow. E.g. "a man rides a horse", "a man on a horse": 6 distinct
                    bigrams / 10 words = 0.60.
  distinct-n/image  the same inside each image's list (distinct n-grams of its k captions / their
                    words), averaged over images
  unique-ngram-ratio-2        distinct bigrams / total bigrams, pooled like distinct-n (the example
                              above: 6 / 8 = 0.75). Not distinct-2: the denominator counts n-grams,
                              not words. For n = 1 it equals distinct-1, so only n = 2 is reported.
  unique-ngram-ratio-2/image  the same inside each image's list, averaged over images
  oracle-CIDEr@k    per image the best CIDEr-D among its k captions, averaged. Caption slot j is
                    scored for all images at once against the same references, so the idf is the
                    one pycocoevalcap uses for the corpus; oracle-CIDEr@1 is the corpus CIDEr-D of
                    the top-1 captions.
  oracle-BLEU-4@k   per image the best sentence-level BLEU-4 (pycocoevalcap's per-image BLEU,
                    with its 1e-15/1e-9 smoothing and closest-reference brevity penalty), averaged.
                    A mean of sentence BLEUs, so oracle-BLEU-4@1 is NOT the corpus BLEU-4.
  mBLEU-4           each caption's sentence BLEU-4 against the other k-1 captions of its image,
                    averaged over all captions (lower = more diverse); omitted when k == 1
  vocab-size        number of distinct words used
"""

from __future__ import annotations

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from captioning.metrics.coco import first_few, ptb_tokenize_lines


def distinct_n(captions: list[str], n: int) -> float:
    """distinct-n (Li et al. 2016): number of distinct n-grams / total number of words.

    Over whitespace-split captions, n-grams taken inside each caption; 0.0 if there are no words.
    """
    unique, _ = _ngram_counts(captions, n)
    words = sum(len(caption.split()) for caption in captions)
    return unique / words if words else 0.0


def unique_ngram_ratio(captions: list[str], n: int) -> float:
    """Number of distinct n-grams / total number of n-grams (not distinct-n); 0.0 if there are no n-grams."""
    unique, total = _ngram_counts(captions, n)
    return unique / total if total else 0.0


def _ngram_counts(captions: list[str], n: int) -> tuple[int, int]:
    """(number of distinct n-grams, total number of n-grams) over whitespace-split captions."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unique, total = set(), 0
    for caption in captions:
        words = caption.split()
        ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(ngrams)
        unique.update(ngrams)
    return len(unique), total


def diversity_report(
    nbest: dict[int, list[str]], references: dict[int, list[str]], k: int | None = None
) -> dict[str, float]:
    """Diversity and oracle metrics of raw n-best captions; PTB-tokenizes captions and references once.

    nbest: {image_id: [caption ranked 1, caption ranked 2, ...]}; references: {image_id: [ref, ...]}
    with the same image ids. k: use the first k captions of each list (None: all, lists must then
    have equal lengths). Keys: see the module docstring; the oracle keys carry k, e.g. "oracle-CIDEr@5".
    """
    ids, k = _check(nbest, references, k)
    captions = [caption for i in ids for caption in nbest[i][:k]]
    refs = [ref for i in ids for ref in references[i]]
    tokenized = iter(ptb_tokenize_lines(captions + refs))
    nbest_tok = {i: [next(tokenized) for _ in range(k)] for i in ids}
    refs_tok = {i: [next(tokenized) for _ in references[i]] for i in ids}
    return diversity_report_tokenized(nbest_tok, refs_tok, k)


def diversity_report_tokenized(
    nbest: dict[int, list[str]], references: dict[int, list[str]], k: int | None = None
) -> dict[str, float]:
    """diversity_report on already PTB-tokenized strings (no Java needed)."""
    ids, k = _check(nbest, references, k)
    lists = [nbest[i][:k] for i in ids]
    all_captions = [caption for captions in lists for caption in captions]
    report = {
        "distinct-1": distinct_n(all_captions, 1),
        "distinct-2": distinct_n(all_captions, 2),
        "distinct-1/image": sum(distinct_n(c, 1) for c in lists) / len(lists),
        "distinct-2/image": sum(distinct_n(c, 2) for c in lists) / len(lists),
        "unique-ngram-ratio-2": unique_ngram_ratio(all_captions, 2),
        "unique-ngram-ratio-2/image": sum(unique_ngram_ratio(c, 2) for c in lists) / len(lists),
    }
    oracle_cider, oracle_bleu = oracle_scores({i: c for i, c in zip(ids, lists)}, references, k)
    report[f"oracle-CIDEr@{k}"] = sum(oracle_cider.values()) / len(ids)
    report[f"oracle-BLEU-4@{k}"] = sum(oracle_bleu.values()) / len(ids)
    if k >= 2:
        report["mBLEU-4"] = self_bleu4(lists)
    report["vocab-size"] = float(len({word for caption in all_captions for word in caption.split()}))
    return report


def oracle_scores(
    nbest: dict[int, list[str]], references: dict[int, list[str]], k: int
) -> tuple[dict[int, float], dict[int, float]]:
    """Per image, the best CIDEr-D and the best sentence BLEU-4 among its first k (tokenized) captions."""
    ids = list(nbest)
    gts = {i: list(references[i]) for i in ids}
    if not any(ref for refs in gts.values() for ref in refs):
        raise ValueError("every reference caption is empty after tokenization")
    best_cider = {i: float("-inf") for i in ids}
    best_bleu = {i: float("-inf") for i in ids}
    for j in range(k):
        res = {i: [nbest[i][j]] for i in ids}  # slot j of every image, scored as one corpus
        _, cider = Cider().compute_score(gts, res)
        _, bleu = Bleu(4).compute_score(gts, res, verbose=0)
        for i, c, b in zip(ids, cider, bleu[3]):
            best_cider[i] = max(best_cider[i], float(c))
            best_bleu[i] = max(best_bleu[i], float(b))
    return best_cider, best_bleu


def self_bleu4(lists: list[list[str]]) -> float:
    """mBLEU-4: mean sentence BLEU-4 of each caption against the other captions of its own list."""
    gts, res = {}, {}
    for i, captions in enumerate(lists):
        if len(captions) < 2:
            raise ValueError("mBLEU-4 needs at least 2 captions per image")
        for j, caption in enumerate(captions):
            gts[(i, j)] = captions[:j] + captions[j + 1 :]
            res[(i, j)] = [caption]
    _, per_caption = Bleu(4).compute_score(gts, res, verbose=0)
    return sum(per_caption[3]) / len(per_caption[3])


def _check(nbest: dict, references: dict, k: int | None) -> tuple[list[int], int]:
    """Validate inputs; return (sorted image ids, k)."""
    if not isinstance(nbest, dict) or not isinstance(references, dict):
        raise TypeError("nbest and references must be dicts keyed by image id")
    if not nbest:
        raise ValueError("no n-best lists given")
    for image_id, captions in list(nbest.items()) + list(references.items()):
        if (
            isinstance(captions, str)
            or not isinstance(captions, (list, tuple))
            or not all(isinstance(c, str) for c in captions)
        ):
            raise TypeError(f"captions for image {image_id!r} must be a list of strings")
    missing = sorted(set(nbest) - set(references))
    if missing:
        raise ValueError(f"no references for {len(missing)} n-best image id(s): {first_few(missing)}")
    extra = sorted(set(references) - set(nbest))
    if extra:
        raise ValueError(f"no n-best list for {len(extra)} image id(s) that have references: {first_few(extra)}")
    no_refs = sorted(i for i, refs in references.items() if not refs)
    if no_refs:
        raise ValueError(f"{len(no_refs)} image(s) have zero reference captions: {first_few(no_refs)}")
    lengths = {i: len(c) for i, c in nbest.items()}
    if k is None:
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"n-best lists have different lengths ({min(lengths.values())} to {max(lengths.values())}); pass k"
            )
        k = next(iter(lengths.values()))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    short = sorted(i for i, n in lengths.items() if n < k)
    if short:
        raise ValueError(f"{len(short)} image(s) have fewer than k={k} captions: {first_few(short)}")
    return sorted(nbest), k
