"""llmkit: from raw text to a trained, fine-tuned and scored language model.

    llmkit quickstart runs/quickstart
"""

__version__ = "0.1.0"
