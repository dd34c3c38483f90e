"""`python -m llmkit ...` and `accelerate launch -m llmkit pretrain RECIPE` enter here."""

from llmkit.cli import main

if __name__ == "__main__":
    main()
