"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and opt-in SPICE), offline.

The numbers are pycocoevalcap's: the same PTB tokenization (Stanford CoreNLP 3.4.1 jar, lower-cased,
the same punctuation removed) and the same scorer classes (Bleu(4), Rouge(), Cider(), Spice()) or,
for METEOR, the same jar, flags and stdio protocol. What differs is only the plumbing:

* COCOEvalCap.evaluate() always runs SPICE, which downloads Stanford models: unusable offline.
  The scorers are called directly here and SPICE is opt-in.
* Their PTBTokenizer writes a temp file into its own package folder (fails on a read-only
  site-packages) and silently misaligns captions with image ids when a caption contains a
  line break other than "\\n" (\\r, \\v, \\f, U+2028, U+2029 all end a line for the Java lexer).
  Here captions go through stdin with every line-break-like character replaced by a space, and
  the number of lines that come back is checked.
* Their METEOR wrapper holds a lock across reads (an exception leaves it held and its __del__
  then blocks the interpreter at exit) and never reads the JVM's stderr pipe. MeteorProcess below
  speaks the same protocol but is closed/killed on any error. The METEOR JVM takes ~7 s to start
  (it loads a paraphrase table, ~1 GB resident), so one process is kept alive between calls
  (validation every N steps) and killed at exit or by close_meteor().

CIDEr note: CIDEr-D's idf comes from the references of the images being scored, so a score
depends on which image set it is computed over (and is exactly 0 for a single image).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import numbers
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module

from captioning.metrics.java import check_java

TOKENIZER_JAR = Path(_ptb_module.__file__).parent / _ptb_module.STANFORD_CORENLP_3_4_1_JAR
PUNCTUATIONS = frozenset(_ptb_module.PUNCTUATIONS)  # removed after tokenizing, as pycocoevalcap does
METEOR_DIR = Path(_meteor_module.__file__).parent
METEOR_JAR = METEOR_DIR / _meteor_module.METEOR_JAR
SPICE_DIR = Path(_meteor_module.__file__).parent.parent / "spice"
SPICE_CORENLP_JAR = SPICE_DIR / "lib" / "stanford-corenlp-3.6.0.jar"  # fetched by pycocoevalcap on first use

DEFAULT_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
KNOWN_METRICS = DEFAULT_METRICS + ("SPICE",)


def figures_of(metric: str) -> tuple[str, ...]:
    """The figures one metric gives: BLEU-1..BLEU-4 for BLEU, its own name for the others."""
    return tuple(f"BLEU-{n}" for n in range(1, 5)) if metric == "BLEU" else (metric,)


# Characters Python treats as line boundaries, plus tab. The Java lexer ends a line at several of
# them, which would break the one-caption-per-line protocol; the rest it treats as whitespace (or,
# for U+0085, as an ellipsis that is then removed as punctuation), so a space gives the same tokens.
_LINE_BREAKS = re.compile("[\n\r\t\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# PTB tokenization


def ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """PTB-tokenize every caption: {image_id: [caption, ...]} -> same shape, tokens joined by spaces.

    Identical to pycocoevalcap's PTBTokenizer().tokenize() (lower-cased, punctuation removed) for
    any caption it handles correctly; needs no writable directory. One JVM call for all captions.
    """
    keys, lines = [], []
    for image_id, caps in captions.items():
        if isinstance(caps, str) or not isinstance(caps, (list, tuple)):
            raise TypeError(f"captions for image {image_id!r} must be a list of strings, got {type(caps).__name__}")
        for caption in caps:
            if not isinstance(caption, str):
                raise TypeError(f"caption for image {image_id!r} must be a string, got {caption!r}")
            keys.append(image_id)
            lines.append(caption)
    tokenized = ptb_tokenize_lines(lines)
    out: dict[int, list[str]] = {image_id: [] for image_id in captions}
    for image_id, line in zip(keys, tokenized):
        out[image_id].append(line)
    return out


def ptb_tokenize_lines(lines: list[str]) -> list[str]:
    """PTB-tokenize a flat list of captions (one JVM call); returns one string per input line."""
    if not lines:
        return []
    java = check_java()
    text = "".join(_LINE_BREAKS.sub(" ", line) + "\n" for line in lines)
    cmd = [java, "-cp", str(TOKENIZER_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    proc = subprocess.run(cmd, input=text.encode("utf-8", errors="replace"), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer ({TOKENIZER_JAR.name}) exited with {proc.returncode}: {_tail(proc.stderr)}")
    out_lines = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(out_lines) == len(lines) + 1 and out_lines[-1] == "":  # every output line ends with "\n"
        out_lines.pop()
    if len(out_lines) != len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(out_lines)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in out_lines]


def _tail(data: bytes, chars: int = 500) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text[-chars:] if text else "(no output on stderr)"


# ---------------------------------------------------------------------------------------------------
# METEOR


class MeteorProcess:
    """One METEOR 1.5 JVM, driven exactly like pycocoevalcap's Meteor (same jar, flags, protocol).

    For every image: "SCORE ||| ref1 ||| ... ||| hyp" -> a line of sufficient statistics; then
    "EVAL ||| stats1 ||| stats2 ..." -> one score per image followed by the corpus-level score
    (computed by the jar from the summed statistics, not the mean of the per-image scores).
    """

    def __init__(self, java: str):
        self.owner_pid = os.getpid()
        self.lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty JVM can never block on it
        cmd = [java, "-jar", "-Xmx2G", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
        self.proc = subprocess.Popen(
            cmd, cwd=METEOR_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both PIPE
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout

    def compute_score(self, gts: dict[int, list[str]], res: dict[int, str]) -> tuple[float, list[float]]:
        """gts: tokenized references per image, res: one tokenized hypothesis per image (same keys)."""
        with self.lock:
            eval_line = "EVAL"
            for image_id in gts:
                hypothesis = res[image_id].replace("|||", "").replace("  ", " ")
                self._write(" ||| ".join(("SCORE", " ||| ".join(gts[image_id]), hypothesis)))
                eval_line += " ||| " + self._readline()
            self._write(eval_line)
            scores = [float(self._readline()) for _ in gts]
            score = float(self._readline())
        return score, scores

    def alive(self) -> bool:
        return os.getpid() == self.owner_pid and self.proc.poll() is None

    def close(self) -> None:
        """Close stdin, kill the JVM and reap it. A no-op in a forked child (the JVM is the parent's)."""
        if os.getpid() != self.owner_pid:
            return
        with contextlib.suppress(OSError):
            self._stdin.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stdout.close()
        self._stderr.close()

    def _write(self, line: str) -> None:
        try:
            self._stdin.write(line.encode("utf-8") + b"\n")
            self._stdin.flush()
        except OSError as e:
            raise RuntimeError(f"METEOR process is gone ({e}); stderr: {self._stderr_tail()}") from e

    def _readline(self) -> str:
        line = self._stdout.readline()
        if not line:
            raise RuntimeError(
                f"METEOR process exited unexpectedly (exit code {self.proc.poll()}); stderr: {self._stderr_tail()}"
            )
        return line.decode("utf-8", errors="replace").strip()

    def _stderr_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return _tail(self._stderr.read())
        return "(unavailable)"


_shared_meteor: MeteorProcess | None = None
_shared_meteor_lock = threading.Lock()


def _get_shared_meteor(java: str) -> MeteorProcess:
    """The METEOR process kept alive between score_captions calls, (re)started when needed."""
    global _shared_meteor
    with _shared_meteor_lock:
        if _shared_meteor is None or not _shared_meteor.alive():
            if _shared_meteor is not None:
                _shared_meteor.close()
            _shared_meteor = MeteorProcess(java)
        return _shared_meteor


def close_meteor() -> None:
    """Kill the METEOR JVM that score_captions keeps alive between calls (also registered atexit)."""
    global _shared_meteor
    with _shared_meteor_lock:
        meteor, _shared_meteor = _shared_meteor, None
    if meteor is not None:
        meteor.close()


atexit.register(close_meteor)


# ---------------------------------------------------------------------------------------------------
# Scoring


def score_captions(
    references: dict[int, list[str]],
    predictions: dict[int, str],
    spice: bool = False,
    metrics: tuple = DEFAULT_METRICS,
    per_image: bool = False,
    reuse_meteor: bool = True,
):
    """Score one predicted caption per image against its reference captions, as pycocoevalcap does.

    references: {image_id: [raw reference caption, ...]}; predictions: {image_id: raw caption}
    (empty strings allowed, scored as empty). Both are PTB-tokenized here. Every prediction needs
    references and every referenced image needs a prediction.
    metrics: any of "BLEU" (gives BLEU-1..4), "METEOR", "ROUGE-L", "CIDEr", "SPICE"; spice=True adds
    SPICE (needs pycocoevalcap's Stanford models already downloaded, see _spice).
    reuse_meteor: keep the METEOR JVM alive for the next call (killed on any error and at exit).
    Returns {name: float}; with per_image=True, (that dict, {name: {image_id: float}}).
    """
    names = _check_metric_names(metrics, spice)
    ids = _check_inputs(references, predictions)
    java = check_java()
    if len(ids) >= 1000:  # COCO's splits take minutes: say what is running
        _log.info("scoring %d images: %s", len(ids), ", ".join(names))
    gts = ptb_tokenize({image_id: list(references[image_id]) for image_id in ids})
    res = ptb_tokenize({image_id: [predictions[image_id]] for image_id in ids})
    if not any(ref for refs in gts.values() for ref in refs):
        raise ValueError("every reference caption is empty after PTB tokenization (punctuation is removed)")

    scores: dict[str, float] = {}
    image_scores: dict[str, dict[int, float]] = {}

    def put(name: str, score, per_image_scores) -> None:
        scores[name] = float(score)
        image_scores[name] = {image_id: float(s) for image_id, s in zip(ids, per_image_scores)}

    try:
        if "BLEU" in names:
            bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                put(f"BLEU-{n + 1}", bleu[n], bleu_per_image[n])
        if "METEOR" in names:
            meteor = _get_shared_meteor(java) if reuse_meteor else MeteorProcess(java)
            try:
                put("METEOR", *meteor.compute_score(gts, {image_id: res[image_id][0] for image_id in ids}))
            finally:
                if not reuse_meteor:
                    meteor.close()
        if "ROUGE-L" in names:
            put("ROUGE-L", *Rouge().compute_score(gts, res))
        if "CIDEr" in names:
            put("CIDEr", *Cider().compute_score(gts, res))
        if "SPICE" in names:
            put("SPICE", *_spice(gts, res))
    except BaseException:
        close_meteor()  # its protocol state is unknown after an error; never leave a JVM behind
        raise
    return (scores, image_scores) if per_image else scores


def _spice(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    """pycocoevalcap's SPICE, refusing to trigger its model download (no network at run time)."""
    if not SPICE_CORENLP_JAR.exists():
        raise RuntimeError(
            f"SPICE needs Stanford CoreNLP 3.6.0 at {SPICE_CORENLP_JAR}, which pycocoevalcap downloads on "
            "first use; run once with internet: python -c 'from pycocoevalcap.spice.get_stanford_models "
            "import get_stanford_models; get_stanford_models()'"
        )
    from pycocoevalcap.spice.spice import Spice

    try:
        score, per_image = Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError) as e:
        raise RuntimeError(
            f"SPICE failed ({e}); SPICE 1.0 needs Java 8 and a writable {SPICE_DIR} (it writes tmp/ and cache/ there)"
        ) from e
    return score, [s["All"]["f"] for s in per_image]


def _check_metric_names(metrics, spice: bool) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(KNOWN_METRICS)}")
    names = tuple(metrics) + (("SPICE",) if spice and "SPICE" not in metrics else ())
    if not names:
        raise ValueError("no metrics requested")
    return names


def _check_inputs(references: dict, predictions: dict) -> list[int]:
    """Validate the two dicts; return the sorted image ids (deterministic scoring order)."""
    if not isinstance(references, dict) or not isinstance(predictions, dict):
        raise TypeError("references and predictions must be dicts keyed by image id")
    if not references:
        raise ValueError("no references given")
    for image_id in list(references) + list(predictions):
        if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):
            raise TypeError(f"image ids must be integers, got {image_id!r}")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise TypeError(f"references for image {image_id} must be a list of strings, got {type(refs).__name__}")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image {image_id} must be a string, got {caption!r}")
    no_refs = sorted(i for i, refs in references.items() if len(refs) == 0)
    if no_refs:
        raise ValueError(f"{len(no_refs)} image(s) have zero reference captions: {first_few(no_refs)}")
    unreferenced = sorted(set(predictions) - set(references))
    if unreferenced:
        raise ValueError(
            f"predictions for {len(unreferenced)} image id(s) that have no references: {first_few(unreferenced)}"
        )
    unpredicted = sorted(set(references) - set(predictions))
    if unpredicted:
        raise ValueError(
            f"no prediction for {len(unpredicted)} image id(s) that have references: {first_few(unpredicted)}"
        )
    return sorted(references)


def first_few(items: list, n: int = 5) -> str:
    """'[1, 2, 3]' or '[1, 2, 3, 4, 5, ...]' for error messages."""
    shown = ", ".join(repr(x) for x in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


# ---------------------------------------------------------------------------------------------------
# Files


def load_results(path: str | os.PathLike) -> dict[int, str]:
    """Read a COCO results file, [{"image_id": int, "caption": str}, ...], into {image_id: caption}.

    Extra keys are ignored. Duplicate image ids are an error (pycocoevalcap would fail on them
    with a bare AssertionError deep inside its scorers).
    """
    path = Path(path)
    data = _read_json(path, "results")
    if not isinstance(data, list):
        raise ValueError(
            f'{path}: expected a JSON list of {{"image_id": int, "caption": str}} '
            f"(COCO results format), got a JSON {type(data).__name__}"
        )
    if not data:
        raise ValueError(f"{path}: the results list is empty")
    results: dict[int, str] = {}
    duplicates: list[int] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(
                f"{path}: entry {index} is a JSON {type(entry).__name__}, expected an object "
                'with "image_id" and "caption"'
            )
        missing = [key for key in ("image_id", "caption") if key not in entry]
        if missing:
            raise ValueError(
                f"{path}: entry {index} lacks {' and '.join(repr(k) for k in missing)}: {json.dumps(entry)[:120]}"
            )
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"{path}: entry {index} has image_id {image_id!r}; expected an integer")
        if not isinstance(caption, str):
            raise ValueError(f"{path}: entry {index} (image_id {image_id}) has caption {caption!r}; expected a string")
        if image_id in results and image_id not in duplicates:
            duplicates.append(image_id)
        results[image_id] = caption
    if duplicates:
        raise ValueError(
            f"{path}: {len(duplicates)} image id(s) appear more than once (one caption per image "
            f"expected): {first_few(duplicates)}"
        )
    return results


def load_references(annotation_file: str | os.PathLike, image_ids=None) -> dict[int, list[str]]:
    """Read reference captions from a COCO captions annotation file (e.g. captions_val2014.json).

    image_ids: restrict to these images (all must be in the file); None means every image in it.
    Every selected image must have at least one caption.
    """
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    dataset = _read_json(path, "annotation")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("annotations"), list):
        raise ValueError(f'{path} is not a COCO annotation file (expected an object with an "annotations" list)')
    for index, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise ValueError(
                f'{path} is not a COCO captions file: annotation {index} lacks an "image_id" or a '
                'string "caption" (instances_*.json files have no captions)'
            )
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    known = set(coco.imgs) | set(coco.imgToAnns)
    if image_ids is None:
        selected = sorted(known)
    else:
        selected = [int(i) for i in image_ids]
        absent = [i for i in selected if i not in known]
        if absent:
            raise ValueError(f"{len(absent)} image id(s) are not in {path}: {first_few(absent)}")
    references = {image_id: [ann["caption"] for ann in coco.imgToAnns.get(image_id, [])] for image_id in selected}
    uncaptioned = [i for i, caps in references.items() if not caps]
    if uncaptioned:
        raise ValueError(f"{len(uncaptioned)} image(s) have no captions in {path}: {first_few(uncaptioned)}")
    return references


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
