"""Score generated text against references on a 0-100 scale.

PIECE protocol (supplementary C): "For classification tasks or question-answering tasks with single-token
labels, the performance score is measured by accuracy; for other tasks, the performance score is the average
of the Rouge-L and BLEU scores." Each metric *kind* below is one way of scoring a task:

| kind | task score | per-example score |
| --- | --- | --- |
| ``choice`` | accuracy (%) on the option letter A-E | 100 or 0 |
| ``number`` | accuracy (%) on the first number, rel. tolerance 1e-6 | 100 or 0 |
| ``exact`` | accuracy (%) on the normalised text | 100 or 0 |
| ``rouge_bleu`` | (mean ROUGE-L F1 × 100 + corpus BLEU) / 2 | (ROUGE-L F1 × 100 + sentence BLEU) / 2 |

Decisions a user should know about:

- ``choice``: the option letter of a prediction is, in this order, (1) a letter A-E at the very start
  (after spaces, brackets, quotes or ``*``) not followed by an ASCII letter ("B", "B. Open…", "B\\nBecause…",
  "(C)", "B反对"); (2) a letter after an answer cue ("The answer is B", "Answer: (B)", "答案：C", "选B");
  (3) the first stand-alone capital A-E anywhere. A lone lower-case letter ("b", "b.") also counts.
  Text is NFKC-normalised first, so full-width "Ａ", "Ｂ。" and "答案：C" work. Caveat: an output that
  starts with the English article ("A clause is…") reads as option A; label words ("中立", "neutral") are
  not mapped to letters. The reference letter is the first character of the reference ("B\\nA clause…" → B);
  a reference that does not start with A-E raises ``ValueError``.
- ``number``: the first number in the prediction ("$5", " 6 frogs", "1,000", "-3", "3.50", full-width
  digits; a number glued to a preceding letter, as in "H2O", is skipped), compared with
  ``math.isclose(rel_tol=1e-6)``; no number scores 0. Fractions and scientific notation are not parsed.
  NumGLUE-cm has a few non-numeric answers ("Friday", "August", "October"): when the reference is not a
  number, the first *k* words of the prediction (k = words in the reference, punctuation dropped,
  case-folded) must equal the reference's words.
- ``exact``: equality after :func:`normalise_text` (NFKC, case-fold, whitespace collapsed and stripped);
  punctuation is kept, so "blue." does not match "blue".
- ``rouge_bleu``: ROUGE-L uses rouge-score with a Unicode tokenizer (see :class:`UnicodeRougeTokenizer`):
  the default one drops every non-ASCII letter (German umlauts split words, Chinese text vanishes). On ASCII
  text it gives exactly the default tokens (no stemming). Chinese/Japanese characters are one token each.
  References with no letter or digit at all (Py150 has answers such as ")" and "} ,") are scored on
  whitespace tokens instead, so an identical prediction gets ROUGE-L 100 rather than 0.
  BLEU is sacrebleu with the ``13a`` tokenizer by default (``bleu_tokenize`` selects another, e.g. ``zh``).
  The corpus BLEU uses ``use_effective_order=True``: identical to standard BLEU whenever the hypotheses
  contain at least one n-gram of every order 1-4, but a corpus of short outputs (e.g. the micro ``reverse``
  task's three words) is no longer scored 0 outright. Sentence BLEU uses sacrebleu's defaults (exp
  smoothing, effective order). sacrebleu returns 100.00000000000004 for identical text; every score here
  is clipped to [0, 100]. The task score uses corpus BLEU, so it is not the mean of ``per_example``.
  An empty (or whitespace-only) prediction scores 0 for its example and still counts in the corpus BLEU
  (its reference length enters the brevity penalty).
- All kinds: mismatched lengths or an empty reference list raise ``ValueError``.
- Protocols: :data:`PROTOCOLS` maps a protocol name to a :class:`Protocol` (its task → kind table and its
  kind → scorer table). Only ``piece`` exists; a ``trace_official`` protocol (SARI, edit similarity, …) is
  added as a new table and a new ``PROTOCOLS`` entry, without touching the PIECE code.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

import sacrebleu
from rouge_score import rouge_scorer
from rouge_score.tokenizers import Tokenizer

MetricKind = Literal["choice", "number", "exact", "rouge_bleu"]
METRIC_KINDS: tuple[str, ...] = get_args(MetricKind)

OPTION_LETTERS = "ABCDE"
NUMBER_REL_TOL = 1e-6


@dataclass(frozen=True)
class TaskScore:
    """A task's score and each example's score, all on 0-100."""

    score: float
    per_example: list[float]


class UnknownTaskError(KeyError):
    """A task has no metric kind in the protocol's table; the message lists the known tasks."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------- text helpers


def _nfkc(text: str) -> str:
    """NFKC-normalise (full-width letters, digits and punctuation become ASCII) and map U+2212 to '-'."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def normalise_text(text: str) -> str:
    """NFKC-normalise, case-fold, collapse runs of whitespace to one space and strip."""
    return " ".join(_nfkc(text).casefold().split())


def _clip(value: float) -> float:
    return min(100.0, max(0.0, float(value)))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------- choice extraction

_LEADING_CHOICE = re.compile(r"^[\s(\[【「『<*'\"]*([A-E])(?![A-Za-z])")
_LONE_LOWER_CHOICE = re.compile(r"^[^A-Za-z0-9]*([a-e])[^A-Za-z0-9]*$")
_CUE_CHOICE = re.compile(
    r"(?i:answer|option|choice|stance|答案|选项|选择|选|态度|立场)"
    r"(?i:\s+is|\s+would\s+be|\s+should\s+be|是|为)?"
    r"\s*:?\s*[(\[【]?\s*([A-E])(?![A-Za-z])"
)
_STANDALONE_CHOICE = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")


def extract_choice(text: str) -> str | None:
    """The option letter (A-E) a generated answer picks, or ``None`` if it names none.

    Tries, in order: a letter at the start, a letter after an answer cue ("answer is", "答案："), a lone
    lower-case letter, the first stand-alone capital A-E anywhere (see the module docstring).
    """
    text = _nfkc(text)
    for pattern in (_LEADING_CHOICE, _CUE_CHOICE, _LONE_LOWER_CHOICE, _STANDALONE_CHOICE):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


def _reference_choice(reference: str, index: int) -> str:
    """The first character of the reference, which must be an option letter."""
    stripped = _nfkc(reference).strip()
    letter = stripped[:1].upper()
    if not letter or letter not in OPTION_LETTERS:
        raise ValueError(f"reference {index} does not start with an option letter A-E: {reference[:40]!r}")
    return letter


# ---------------------------------------------------------------------------------------- number extraction

_NUMBER_BODY = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])" + _NUMBER_BODY)
_WHOLE_NUMBER = re.compile(r"\$?(" + _NUMBER_BODY + r")%?")


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def extract_number(text: str) -> float | None:
    """The first number in ``text`` as a float ("$1,000.50 total" → 1000.5), or ``None`` if there is none."""
    match = _NUMBER.search(_nfkc(text))
    return _to_float(match.group(0)) if match else None


def _reference_number(reference: str) -> float | None:
    """The reference as a number if it is one ("13.5", "1,000", "$5"), else ``None`` ("Friday")."""
    match = _WHOLE_NUMBER.fullmatch(_nfkc(reference).strip())
    return _to_float(match.group(1)) if match else None


_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(normalise_text(text))


def _number_correct(prediction: str, reference: str) -> bool:
    expected = _reference_number(reference)
    if expected is None:  # non-numeric NumGLUE answers ("Friday"): compare the leading words
        ref_words = _words(reference)
        return bool(ref_words) and _words(prediction)[: len(ref_words)] == ref_words
    got = extract_number(prediction)
    return got is not None and math.isclose(got, expected, rel_tol=NUMBER_REL_TOL, abs_tol=1e-12)


# ------------------------------------------------------------------------------------------ ROUGE-L / BLEU

# Han ideographs (incl. extension A and compatibility) and Japanese kana: one token per character, as usual
# for Chinese ROUGE, since these scripts do not separate words with spaces.
_CJK_CHAR = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
_UNICODE_TOKEN = re.compile(rf"{_CJK_CHAR}|(?:(?!{_CJK_CHAR})[^\W_])+")


class UnicodeRougeTokenizer(Tokenizer):
    """ROUGE tokenizer that keeps Unicode letters and digits.

    rouge-score's default tokenizer lower-cases and then replaces every character outside ``[a-z0-9]`` by
    a space: "schön" becomes the two tokens "sch" and "n", and Chinese text has no tokens at all (ROUGE-L 0
    even for an identical prediction). This one NFKC-normalises and case-folds, then takes maximal runs of
    Unicode letters/digits (underscore is a separator, as in the default) and every CJK character on its
    own. For ASCII text the tokens are exactly the default tokenizer's.
    """

    def tokenize(self, text: str) -> list[str]:
        return _UNICODE_TOKEN.findall(_nfkc(text).casefold())


class WhitespaceTokenizer(Tokenizer):
    """Whitespace tokens, for references made only of punctuation (Py150's ")" or "} ,")."""

    def tokenize(self, text: str) -> list[str]:
        return _nfkc(text).split()


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeRougeTokenizer())
_ROUGE_WHITESPACE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 × 100 of one prediction (0 if empty); punctuation-only references use whitespace tokens."""
    if not prediction.strip():
        return 0.0
    scorer = _ROUGE if _UNICODE_TOKEN.search(_nfkc(reference)) else _ROUGE_WHITESPACE
    return _clip(100.0 * scorer.score(reference, prediction)["rougeL"].fmeasure)  # score(target, prediction)


def sentence_bleu(prediction: str, reference: str, tokenize: str = "13a") -> float:
    """sacrebleu sentence BLEU (0-100; 0 if the prediction is empty)."""
    if not prediction.strip():
        return 0.0
    return _clip(sacrebleu.sentence_bleu(prediction, [reference], tokenize=tokenize).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU (0-100) with effective order, so corpora of short outputs are not scored 0."""
    result = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize, use_effective_order=True)
    return _clip(result.score)


# ------------------------------------------------------------------------------------------------- scorers


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; they must pair up")
    if not references:
        raise ValueError("no references to score (empty reference list)")


def _accuracy(correct: Sequence[bool]) -> TaskScore:
    per_example = [100.0 if ok else 0.0 for ok in correct]
    return TaskScore(score=_mean(per_example), per_example=per_example)


def score_choice(predictions: Sequence[str], references: Sequence[str]) -> TaskScore:
    """Accuracy on the option letter: :func:`extract_choice` of the prediction vs the reference's first letter."""
    _check_lengths(predictions, references)
    return _accuracy(
        [extract_choice(p) == _reference_choice(r, i) for i, (p, r) in enumerate(zip(predictions, references))]
    )


def score_number(predictions: Sequence[str], references: Sequence[str]) -> TaskScore:
    """Accuracy on the first number of the prediction (leading words for non-numeric references)."""
    _check_lengths(predictions, references)
    return _accuracy([_number_correct(p, r) for p, r in zip(predictions, references)])


def score_exact(predictions: Sequence[str], references: Sequence[str]) -> TaskScore:
    """Accuracy on :func:`normalise_text` equality."""
    _check_lengths(predictions, references)
    return _accuracy([normalise_text(p) == normalise_text(r) for p, r in zip(predictions, references)])


def score_rouge_bleu(
    predictions: Sequence[str], references: Sequence[str], *, bleu_tokenize: str = "13a"
) -> TaskScore:
    """PIECE generation score: (mean ROUGE-L F1 × 100 + corpus BLEU) / 2; per example with sentence BLEU."""
    _check_lengths(predictions, references)
    rouges = [rouge_l(p, r) for p, r in zip(predictions, references)]
    per_example = [
        (rouge + sentence_bleu(p, r, bleu_tokenize)) / 2 for rouge, p, r in zip(rouges, predictions, references)
    ]
    score = (_mean(rouges) + corpus_bleu(predictions, references, bleu_tokenize)) / 2
    return TaskScore(score=score, per_example=per_example)


KindScorer = Callable[[Sequence[str], Sequence[str]], TaskScore]

PIECE_SCORERS: Mapping[str, KindScorer] = MappingProxyType(
    {
        "choice": score_choice,
        "number": score_number,
        "exact": score_exact,
        "rouge_bleu": score_rouge_bleu,
    }
)


def score_predictions(
    kind: MetricKind, predictions: Sequence[str], references: Sequence[str], *, bleu_tokenize: str = "13a"
) -> TaskScore:
    """Score ``predictions`` against ``references`` with metric ``kind`` (PIECE definitions)."""
    if kind == "rouge_bleu":
        return score_rouge_bleu(predictions, references, bleu_tokenize=bleu_tokenize)
    if kind not in PIECE_SCORERS:
        raise ValueError(f"unknown metric kind {kind!r}; known kinds: {', '.join(METRIC_KINDS)}")
    return PIECE_SCORERS[kind](predictions, references)


# ----------------------------------------------------------------------------------------------- protocols

TRACE_TASK_KINDS: dict[str, MetricKind] = {
    "C-STANCE": "choice",
    "FOMC": "choice",
    "ScienceQA": "choice",
    "NumGLUE-cm": "number",
    "NumGLUE-ds": "number",
    "MeetingBank": "rouge_bleu",
    "20Minuten": "rouge_bleu",
    "Py150": "rouge_bleu",
}
"""PIECE protocol kinds of the TRACE tasks (Lima is alignment data without answers: not scoreable)."""


@dataclass(frozen=True)
class Protocol:
    """A scoring protocol: which kind each task uses and how each kind is scored."""

    name: str
    task_kinds: Mapping[str, str]
    scorers: Mapping[str, KindScorer]


PROTOCOLS: Mapping[str, Protocol] = MappingProxyType(
    {
        "piece": Protocol(name="piece", task_kinds=TRACE_TASK_KINDS, scorers=PIECE_SCORERS),
        # "trace_official": Protocol("trace_official", TRACE_OFFICIAL_KINDS, TRACE_OFFICIAL_SCORERS),
    }
)


def get_protocol(protocol: str) -> Protocol:
    """The :class:`Protocol` named ``protocol``; ``ValueError`` listing the supported ones otherwise."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r}; supported: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[protocol]


def task_kind(task: str, protocol: str = "piece") -> str:
    """The metric kind ``protocol`` uses for ``task``; :class:`UnknownTaskError` listing known tasks otherwise."""
    table = get_protocol(protocol).task_kinds
    if task not in table:
        raise UnknownTaskError(
            f"no metric kind for task {task!r} under protocol {protocol!r}; known tasks: {', '.join(table)} "
            f"(pass kind= to score another task)"
        )
    return table[task]


def score_task(
    task: str,
    predictions: Sequence[str],
    references: Sequence[str],
    protocol: str = "piece",
    kind: MetricKind | None = None,
) -> float:
    """The score (0-100) of ``task`` under ``protocol``; ``kind`` overrides the task's kind from the table."""
    proto = get_protocol(protocol)
    resolved = kind if kind is not None else task_kind(task, protocol)
    if resolved not in proto.scorers:
        raise ValueError(
            f"protocol {protocol!r} has no scorer for kind {resolved!r}; known kinds: {', '.join(proto.scorers)}"
        )
    return proto.scorers[resolved](predictions, references).score
