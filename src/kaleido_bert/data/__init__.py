"""Catalogues (paper §4.1): the catalogue format, importers, image checks, the synthetic catalogue, the tokenizer."""
