"""Answer-quality metrics for comparing reduction modes (pure Python; no vLLM)."""

from vllm_prumerge.evaluation.intervals import paired_delta, wilson
from vllm_prumerge.evaluation.vqa import (
    answers_agree,
    exact_match,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)

__all__ = [
    "answers_agree",
    "exact_match",
    "normalize_answer",
    "paired_delta",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "wilson",
]
