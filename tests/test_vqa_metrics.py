"""The VQA metric functions against cases worked by hand from the official evaluation's rules.

Every expected value below was derived on paper from the rules of the official script
(GT-Vision-Lab/VQA `vqaEval.py`): punctuation next to a space or in a text with a
digit-comma-digit is deleted, otherwise replaced by a space; periods not followed by a digit are
deleted; then lower case, number words to digits, articles dropped, contractions restored; the
accuracy averages `min(#other matching annotators / 3, 1)` over every annotator left out.
"""

from __future__ import annotations

import pytest

from vllm_prumerge.evaluation import (
    answers_agree,
    exact_match,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2,000", "2000"),  # digit-comma-digit: every mark deleted, no space
        ("1,2", "12"),
        ("1, 2", "1 2"),  # comma next to a space: deleted (no digit-comma-digit)
        ("hello, world", "hello world"),
        ("e.g.", "eg"),  # periods not followed by a digit are deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes.", "yes"),
        (".5", ".5"),
        ("black-and-white", "black and white"),  # no space next to '-': becomes a space
        ("t-shirt", "t shirt"),
        ("(yes)", " yes "),  # each parenthesis becomes a space
        ("a/b, c", "a b c"),  # '/' becomes a space, ', ' is deleted
        ("$1,000.00", "$1000.00"),  # '$' is not a listed mark
        ("what?!", "what  "),
        ("don't", "don't"),  # the apostrophe is not a listed mark
        ("10:30", "10:30"),  # nor the colon
        ("left -right", "left right"),  # ' -' occurs: '-' deleted everywhere
    ],
)
def test_punctuation_follows_the_official_rules(text, expected):
    assert process_punctuation(text) == expected


def test_at_most_32_periods_are_removed_as_in_the_official_script():
    # re.UNICODE (32) is passed as sub()'s count there.
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("." * 32) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Two dogs", "2 dogs"),  # lower case, number word, article
        ("an apple", "apple"),
        ("a", ""),
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the table's capitalised keys never match after lower-casing
        ("  many   spaces ", "many spaces"),
    ],
)
def test_digits_articles_and_contractions(text, expected):
    assert process_digit_article(text) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Two.", "2"),
        ("The answer\tis\nyes", "answer is yes"),
        ("  A Dog!  ", "dog"),
        ("2,000 people", "2000 people"),
        ("Don't know", "don't know"),
    ],
)
def test_a_prediction_is_fully_normalised(prediction, expected):
    assert normalize_answer(prediction) == expected


# With 10 annotators of whom k gave the predicted answer: the k subsets that leave out one of
# them see k-1 matches, the 10-k others see k, so accuracy = (k*min(1,(k-1)/3) +
# (10-k)*min(1,k/3)) / 10.
@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_partial_annotator_agreement_over_ten_answers(matching, expected):
    answers = ["cat"] * matching + ["dog", "cow", "pig", "rat", "owl"] * 2
    answers = answers[:10]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_identical_answers_from_different_annotators_all_count():
    # Leave-one-out by annotator, not by value: 10 x "yes" gives 9 matches in every subset.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["cat"], 0.0),  # nobody is left to agree with
        (["cat", "cat"], 1 / 3),  # each subset: 1 match
        (["cat", "cat", "dog"], 4 / 9),  # (1/3 + 1/3 + 2/3) / 3
        (["cat", "cat", "cat"], 2 / 3),  # fewer than 4 answers never reach 1
        (["cat"] * 4, 1.0),
        (["dog", "cow", "cat", "cat", "cat"], 0.8),  # (1 + 1 + 2/3*3) / 5
    ],
)
def test_fewer_than_ten_answers_average_over_as_many_subsets(answers, expected):
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_prediction_is_normalised_and_references_only_lose_punctuation():
    answers = ["2", "2", "2", "two", "dog.", "2"]
    # "Two" -> "2": four references equal "2", "two" stays "two" (references are not digit-
    # mapped): subsets leaving out a "2" see 3 matches, the two others 4 -> all 1.
    assert vqa_accuracy("Two", answers) == 1.0
    # "dog." -> "dog" in the references (answers differ, so punctuation is processed): one
    # match; the five subsets without it see 1/3, the one leaving it out 0 -> 5/18.
    assert vqa_accuracy("dog", answers) == pytest.approx(5 / 18)
    # "two" as a prediction becomes "2"; the reference "two" is never matched.
    assert vqa_accuracy("two", ["two"] * 4 + ["three"]) == 0.0


def test_all_identical_references_are_taken_verbatim():
    # No processing when the references agree: "yes." never equals the prediction "yes".
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # One differing reference switches processing on: all ten become "yes" -> 9 matches each.
    assert vqa_accuracy("yes", ["yes."] * 9 + ["yes"]) == 1.0


def test_hand_written_labels_can_be_normalised_fully():
    assert vqa_accuracy("two", ["Two"] * 4, normalize_references=True) == 1.0
    labels = ["A dog", "the dog", "dog", "Dog."]
    assert vqa_accuracy("dog", labels, normalize_references=True) == 1.0


def test_exact_match_and_agreement_use_normalised_answers():
    assert exact_match("Two", ["two"]) == 1.0  # references fully normalised by default
    assert exact_match("Two", ["two"], normalize_references=False) == 0.0
    assert exact_match("a cat", ["dog", "Cat!"]) == 1.0
    assert exact_match("cow", ["dog", "cat"]) == 0.0
    assert answers_agree("The two dogs.", "2 dogs")
    assert not answers_agree("two dogs", "3 dogs")


@pytest.mark.parametrize("bad", [[], "cat", [1, 2], None])
def test_bad_references_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        vqa_accuracy("cat", bad)


def test_a_non_string_prediction_is_refused():
    with pytest.raises(TypeError):
        normalize_answer(None)


@pytest.mark.parametrize(("successes", "total"), [(3, 10), (0, 7), (81, 263), (5, 5)])
def test_wilson_interval_ends_are_the_roots_of_its_defining_equation(successes, total):
    """Wilson's interval: the p with (p_hat - p)^2 = z^2 p (1 - p) / n, solved here as a
    quadratic by numpy (the module uses the closed form)."""
    import numpy as np

    from vllm_prumerge.evaluation import wilson

    z, p_hat, n = 1.96, successes / total, total
    # (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 = 0
    roots = sorted(np.roots([1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat]).real)
    assert wilson(successes, total) == pytest.approx((max(0, roots[0]), min(1, roots[1])))
    assert wilson(0, 0) is None


def test_paired_delta_is_the_mean_difference_with_a_normal_interval():
    from vllm_prumerge.evaluation import paired_delta

    # Differences 1, 0, 2: mean 1, sample sd 1, half-width 1.96 / sqrt(3).
    delta = paired_delta([3, 1, 4], [2, 1, 2])
    half = 1.96 / 3**0.5
    assert delta == pytest.approx({"mean": 1, "ci95_low": 1 - half, "ci95_high": 1 + half})
    assert paired_delta([1], [0]) is None
