"""The base of the house: errors, atomic files, cache paths, Hugging Face loading and run outputs.

Nothing here imports another project package (``lightning_modules``, ``callbacks``, ``datamodules``),
so every other package can build on it without import cycles; ``pyproject.toml`` declares the
layering and CI checks it with import-linter.
"""
