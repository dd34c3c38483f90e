"""Data: sources and built-in corpora, the tokenization cache, packing, streaming, fine-tuning examples, splits.

    llmkit data prepare pretrain/tiny
"""
