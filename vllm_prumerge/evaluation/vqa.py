"""VQA answer normalisation and accuracy, as the official VQA evaluation computes them.

Re-implemented from the rules of the official evaluation script (GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`, Python 3 version at commit c4e6a0e), which
VQAv2 and TextVQA numbers (and LLaVA's, and lmms-eval's) are computed with:

- a predicted answer has tabs and newlines turned into spaces, is stripped, then goes through
  `process_punctuation` and `process_digit_article`;
- the reference (annotator) answers go through `process_punctuation` only, and only when they are
  not all identical (the official annotations are already normalised when collected);
- accuracy = the mean, over every annotator left out in turn, of
  `min(#other annotators who gave exactly that answer / 3, 1)`: with 10 answers, the average
  over the 10 subsets of 9. One matching annotator scores 0.3, two 0.6, three 0.9, four or
  more 1.0. With n answers the average is over n subsets; with a single answer the score is
  always 0 (nobody else is left to agree), and fewer than 4 answers can never reach 1.0.

`vqa_accuracy(..., normalize_references=True)` also applies the full normalisation (including
digits, articles and contractions) to the references: for hand-written labels such as "Two" or
"a dog", which the official rules would never match. Pure Python; no vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import MappingProxyType

# Punctuation removed (or turned into a space) by `process_punctuation`, in the official order.
# The period is handled separately; the apostrophe and the colon are kept.
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# Number words (and "none") that become digits.
NUMBER_WORDS = MappingProxyType(
    {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }
)

ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without their apostrophes, mapped to the apostrophe form; the official
# table verbatim. Its keys with a capital "I" ("Im", "Ive", "Id've", "I'dve") can never match,
# since words are lower-cased first: kept for fidelity.
CONTRACTIONS = MappingProxyType(
    {
        "aint": "ain't",
        "arent": "aren't",
        "cant": "can't",
        "couldve": "could've",
        "couldnt": "couldn't",
        "couldn'tve": "couldn't've",
        "couldnt've": "couldn't've",
        "didnt": "didn't",
        "doesnt": "doesn't",
        "dont": "don't",
        "hadnt": "hadn't",
        "hadnt've": "hadn't've",
        "hadn'tve": "hadn't've",
        "hasnt": "hasn't",
        "havent": "haven't",
        "hed": "he'd",
        "hed've": "he'd've",
        "he'dve": "he'd've",
        "hes": "he's",
        "howd": "how'd",
        "howll": "how'll",
        "hows": "how's",
        "Id've": "I'd've",
        "I'dve": "I'd've",
        "Im": "I'm",
        "Ive": "I've",
        "isnt": "isn't",
        "itd": "it'd",
        "itd've": "it'd've",
        "it'dve": "it'd've",
        "itll": "it'll",
        "let's": "let's",
        "maam": "ma'am",
        "mightnt": "mightn't",
        "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've",
        "mightve": "might've",
        "mustnt": "mustn't",
        "mustve": "must've",
        "neednt": "needn't",
        "notve": "not've",
        "oclock": "o'clock",
        "oughtnt": "oughtn't",
        "ow's'at": "'ow's'at",
        "'ows'at": "'ow's'at",
        "'ow'sat": "'ow's'at",
        "shant": "shan't",
        "shed've": "she'd've",
        "she'dve": "she'd've",
        "she's": "she's",
        "shouldve": "should've",
        "shouldnt": "shouldn't",
        "shouldnt've": "shouldn't've",
        "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd",
        "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll",
        "somebodys": "somebody's",
        "someoned": "someone'd",
        "someoned've": "someone'd've",
        "someone'dve": "someone'd've",
        "someonell": "someone'll",
        "someones": "someone's",
        "somethingd": "something'd",
        "somethingd've": "something'd've",
        "something'dve": "something'd've",
        "somethingll": "something'll",
        "thats": "that's",
        "thered": "there'd",
        "thered've": "there'd've",
        "there'dve": "there'd've",
        "therere": "there're",
        "theres": "there's",
        "theyd": "they'd",
        "theyd've": "they'd've",
        "they'dve": "they'd've",
        "theyll": "they'll",
        "theyre": "they're",
        "theyve": "they've",
        "twas": "'twas",
        "wasnt": "wasn't",
        "wed've": "we'd've",
        "we'dve": "we'd've",
        "weve": "we've",
        "werent": "weren't",
        "whatll": "what'll",
        "whatre": "what're",
        "whats": "what's",
        "whatve": "what've",
        "whens": "when's",
        "whered": "where'd",
        "wheres": "where's",
        "whereve": "where've",
        "whod": "who'd",
        "whod've": "who'd've",
        "who'dve": "who'd've",
        "wholl": "who'll",
        "whos": "who's",
        "whove": "who've",
        "whyll": "why'll",
        "whyre": "why're",
        "whys": "why's",
        "wont": "won't",
        "wouldve": "would've",
        "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've",
        "wouldn'tve": "wouldn't've",
        "yall": "y'all",
        "yall'll": "y'all'll",
        "y'allll": "y'all'll",
        "yall'd've": "y'all'd've",
        "y'alld've": "y'all'd've",
        "y'all'dve": "y'all'd've",
        "youd": "you'd",
        "youd've": "you'd've",
        "you'dve": "you'd've",
        "youll": "you'll",
        "youre": "you're",
        "youve": "you've",
    }
)

# A digit, a comma, a digit ("2,000"): its presence anywhere removes every punctuation mark
# without leaving a space.
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit. The official pattern starts with `(?!<=\d)`, a lookahead
# (not a lookbehind) that can never match at a period, so it has no effect: "e.g." -> "eg",
# "3.5" keeps its period, "5." loses it.
_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) as `sub`'s positional `count`, so at most 32
# periods are removed from one answer.
_PERIOD_LIMIT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    Each mark of `PUNCTUATION` is deleted if it appears next to a space anywhere in the
    original text, or if the text contains a digit-comma-digit ("2,000"); otherwise it becomes
    a space. Then periods not followed by a digit are deleted (at most 32).
    """
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, split on whitespace, number words to
    digits, drop articles, restore contractions, join with single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """What the official script does to a predicted answer before comparing it: tabs and
    newlines to spaces, strip, `process_punctuation`, `process_digit_article`."""
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a string, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _references(answers: Sequence[str], normalize_references: bool) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError("answers must be a list of strings (one per annotator)")
    if not answers:
        raise ValueError("answers must not be empty")
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"each reference answer must be a string, got {answer!r}")
    if normalize_references:
        return [normalize_answer(a) for a in answers]
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


def vqa_accuracy(
    prediction: str, answers: Sequence[str], *, normalize_references: bool = False
) -> float:
    """VQA accuracy of one predicted answer against the annotators' answers, in [0, 1].

    The official rule: for each annotator i, count the *other* annotators whose answer equals
    the normalised prediction, score `min(count / 3, 1)`; average over i. Annotators are left
    out by position, so identical answers from different annotators all count.
    `normalize_references`: normalise the references fully (see the module docstring).
    """
    predicted = normalize_answer(prediction)
    references = _references(answers, normalize_references)
    matches = sum(reference == predicted for reference in references)
    scores = [min(1.0, (matches - (reference == predicted)) / 3) for reference in references]
    return sum(scores) / len(scores)


def exact_match(
    prediction: str, answers: Sequence[str], *, normalize_references: bool = True
) -> float:
    """1.0 if the normalised prediction equals any reference answer, else 0.0.

    References are fully normalised by default (single-answer labels); with
    `normalize_references=False` they are treated as `vqa_accuracy` treats them.
    """
    predicted = normalize_answer(prediction)
    return float(predicted in _references(answers, normalize_references))


def answers_agree(first: str, second: str) -> bool:
    """Whether two predicted answers are equal after the official normalisation."""
    return normalize_answer(first) == normalize_answer(second)
