"""Evaluation as one component: the Evaluator interface (base.py), one module per evaluator, the registry.

    python -c "from llmkit.evals.registry import EVALUATORS; print(sorted(EVALUATORS))"

`llmkit eval` (llmkit/stages/evaluate.py) and the training loop's train.evals (training.py) run the
same evaluators through scoring.py, so a checkpoint gets the same numbers from both.
"""
