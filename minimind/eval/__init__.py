"""Evaluation: perplexity / bits per byte, multiple-choice accuracy, exact-match of chat answers."""

from minimind.eval.choice import evaluate_choice
from minimind.eval.exact import evaluate_exact
from minimind.eval.ppl import evaluate_ppl

__all__ = ["evaluate_choice", "evaluate_exact", "evaluate_ppl"]
