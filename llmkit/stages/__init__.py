"""One module per command, all of the same shape: cheap checks that load no weights, then build, then `run`.

    llmkit pretrain pretrain/tiny       # llmkit/stages/pretrain.py: run(recipe, overwrite)
"""
