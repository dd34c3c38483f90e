"""Metrics shipped inside llmkit so they work offline: each subpackage holds plain scoring functions
and an `evaluate` module that `evaluate.load(<directory>)` reads from the installed package.

    python -c "import evaluate, llmkit.metrics.rouge as r; print(evaluate.load(r.MODULE_PATH).compute(predictions=['a'], references=['a']))"
"""
