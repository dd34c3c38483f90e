"""ROUGE as an `evaluate` metric that loads from a path, offline (`evaluate.load("rouge")` needs the Hub).

    HF_HUB_OFFLINE=1 python -c "import evaluate, llmkit.metrics.rouge as r; m = evaluate.load(r.MODULE_PATH); print(m.compute(predictions=['the cat sat'], references=['a cat sat']))"

The scores are llmkit.metrics.rouge.scoring's: rouge_score's F-measures with the Porter stemmer,
averaged exactly over examples (not the median of bootstrap resamples that the Hub's rouge reports),
one sentence per line for rougeLsum, non-Latin scripts kept. Arguments follow the Hub's rouge
metric (rouge_types, use_stemmer, use_aggregator) plus bootstrap_samples / confidence / seed.
"""

import datasets
import evaluate

from llmkit.metrics.rouge.scoring import ROUGE_TYPES, aggregate, per_example_scores

_DESCRIPTION = """ROUGE-N and ROUGE-L F-measures between predictions and references, equal to
rouge_score's RougeScorer(use_stemmer=True), averaged over examples. rougeLsum expects one sentence
per line. Pairs containing non-Latin letters are tokenized so that the script is kept."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted texts.
    references: list of reference texts, or of lists of references (best score per type is kept).
    rouge_types: subset of rouge1..rouge9, rougeL, rougeLsum (default: rouge1, rouge2, rougeL, rougeLsum).
    use_stemmer: apply the Porter stemmer to words longer than 3 characters (default True).
    use_aggregator: return the mean over examples (True) or one list of scores per type (False).
    bootstrap_samples: when > 0 (and aggregating), also return <type>_low and <type>_high.
    confidence: level of the bootstrap interval (default 0.95).
    seed: bootstrap seed (default 1234).
Returns:
    dict mapping each rouge type to a fraction in [0, 1] (or a list of them).
"""

_CITATION = """@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    pages = "74--81",
}"""


class Rouge(evaluate.Metric):
    """ROUGE F-measures, exact mean over examples, with an optional seeded bootstrap interval."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013/"],
        )

    def _compute(
        self,
        predictions,
        references,
        rouge_types=None,
        use_stemmer=True,
        use_aggregator=True,
        bootstrap_samples=0,
        confidence=0.95,
        seed=1234,
    ):
        types = tuple(rouge_types) if rouge_types else ROUGE_TYPES
        scores = per_example_scores(predictions, references, types, use_stemmer)
        if not use_aggregator:
            return {t: [s[t] for s in scores] for t in types}
        return aggregate(scores, bootstrap_samples, confidence, seed)
