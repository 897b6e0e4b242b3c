"""Tokenizers: SentencePiece BPE trained on the project's own corpus with LLaMA / Baichuan 2 choices, and
the Hugging Face `tokenizer.json` of today's open weights (Llama 3, Qwen, Mistral, Gemma) read with the
`tokenizers` library -- the reference implementation `AutoTokenizer` wraps. `load(path)` takes either file
(or a folder holding one) and returns an object with one interface: `encode` / `decode` (no bos/eos added:
the caller frames text itself), the bos / eos / pad ids, `vocab_size`, `piece_to_id` / `id_to_piece`.

The trained SentencePiece models:

Choices (Touvron et al. 2023, LLaMA section 2.1; Yang et al. 2023, Baichuan 2 section 2.2):
  * BPE via SentencePiece; digits split into single-digit pieces (numbers tokenize uniformly).
  * byte fallback: a character outside the vocabulary becomes its UTF-8 byte pieces, never <unk>, so any
    text -- Chinese, emoji, control characters -- round-trips.
  * no normalization ("identity"), no dummy prefix, no whitespace collapsing (Baichuan 2), and
    whitespace-only pieces so code indentation costs few tokens.
  * user-defined symbols (chat markers such as <|im_start|>) are single, never-split pieces.
Fixed ids: pad=0, unk=1, bos=2, eos=3; the vocabulary is exactly `config.model.vocab_size` pieces.

SentencePiece trains on "sentences" = lines, so documents are fed line by line (newlines themselves are
encoded through byte fallback as <0x0A>, like LLaMA). Training is deterministic: every line is used in
order (no sampling, no shuffling) with a fixed thread count, which the BPE result depends on.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator

import ml_collections
import sentencepiece as spm

from maxlm import data
from maxlm.errors import ConfigError, InputError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_SENTENCE_BYTES = 1 << 16  # longer lines are skipped (SentencePiece would drop them anyway)
TRAIN_THREADS = 8  # fixed: the learned merges depend on the thread count, not on the machine's cores
_META = "\u2581"  # SentencePiece's whitespace marker; decodes to " ", so a literal one is sent as bytes


class Tokenizer:
    """A loaded SentencePiece model. `encode` adds no bos/eos: the packer frames documents itself."""

    def __init__(self, path: str):
        self._path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        meta_bytes = [f"<0x{b:02X}>" for b in _META.encode("utf-8")]
        ids = [self._sp.piece_to_id(p) for p in meta_bytes]
        self._meta_ids = ids if all(self._sp.is_byte(i) for i in ids) else None

    def encode(self, text: str) -> list[int]:
        if self._meta_ids is None or _META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(_META)):
            if k:
                ids += self._meta_ids
            ids += self._sp.encode(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def path(self) -> str:
        return self._path


HF_FILE = "tokenizer.json"  # a Hugging Face fast tokenizer
SP_FILE = "tokenizer.model"  # a SentencePiece model
HF_CONFIG = "tokenizer_config.json"  # beside tokenizer.json: which added tokens are bos / eos / pad
HF_TEMPLATE = "chat_template.jinja"  # beside tokenizer.json: the model's chat template (transformers >= 4.5x)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (byte-level BPE of Llama 3 / Qwen / Mistral, or a converted
    SentencePiece model), through the `tokenizers` library, with the bos / eos / pad tokens named by the
    `tokenizer_config.json` beside it. `encode` adds no special tokens (as `AutoTokenizer`'s
    `add_special_tokens=False`), so ids equal AutoTokenizer's; `decode` drops bos / eos / pad (as
    SentencePiece drops its control pieces) and keeps other added tokens (chat markers) as text.

    A model without a pad token pads with its eos id (what fine-tuning recipes for Llama 3 do): padding is
    only a filler here, never attended to nor trained on.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        self._path = path
        try:
            self._tok = _Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 -- the Rust loader raises a bare Exception
            raise InputError(f"{path} is not a Hugging Face tokenizer.json ({' '.join(str(e).split())[:200]})") from None
        special = _special_tokens(os.path.join(os.path.dirname(os.path.abspath(path)), HF_CONFIG))
        self._ids = {name: (self._tok.token_to_id(token) if token else None) for name, token in special.items()}
        for name, token in special.items():
            if token and self._ids[name] is None:
                raise InputError(f"{path}: {HF_CONFIG} names {name}_token {token!r}, which is not in the vocabulary")
        self._control = {i for i in self._ids.values() if i is not None}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, the [start, end) character span of `text` each id came from) -- how a chat template's
        rendered text is mapped back to trained tokens."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) not in self._control], skip_special_tokens=False)

    def piece_to_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        return self.unk_id if i is None else i

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        for name in ("pad", "eos"):
            if self._ids[name] is not None:
                return self._ids[name]
        return 0

    @property
    def unk_id(self) -> int:
        return -1 if self._ids["unk"] is None else self._ids["unk"]

    @property
    def bos_id(self) -> int:
        return -1 if self._ids["bos"] is None else self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return -1 if self._ids["eos"] is None else self._ids["eos"]

    @property
    def path(self) -> str:
        return self._path

    def missing(self, pieces: Iterable[str]) -> list[str]:
        """The `pieces` not in the vocabulary, once each, in order."""
        return [p for p in dict.fromkeys(pieces) if self._tok.token_to_id(p) is None]

    def save_with(self, pieces: Iterable[str], out_path: str) -> list[str]:
        """Write this tokenizer with `pieces` it lacks appended as special added tokens (matched whole
        before the pre-tokenizer, never split, existing ids unchanged) to `out_path`, and its
        tokenizer_config.json beside it; returns the pieces added."""
        from tokenizers import AddedToken

        added = self.missing(pieces)
        self._tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in added])
        _write_atomic(out_path, self._tok.to_str().encode("utf-8"))
        for name in (HF_CONFIG, HF_TEMPLATE):
            _copy_beside(self._path, out_path, name)
        return added


def _special_tokens(config_path: str) -> dict[str, str | None]:
    """{"bos", "eos", "pad", "unk"} -> token text from a tokenizer_config.json (string or AddedToken dict)."""
    cfg = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise InputError(f"{config_path} is not valid JSON ({e})") from None
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        value = cfg.get(f"{name}_token")
        out[name] = value.get("content") if isinstance(value, dict) else value
    return out


def _copy_beside(source_file: str, target_file: str, name: str) -> None:
    """Copy `name` from beside `source_file` to beside `target_file` (when there is one and they differ)."""
    src = os.path.join(os.path.dirname(os.path.abspath(source_file)), name)
    dst = os.path.join(os.path.dirname(os.path.abspath(target_file)), name)
    if os.path.exists(src) and os.path.abspath(src) != dst:
        with open(src, "rb") as f:
            _write_atomic(dst, f.read())


def resolve(path: str) -> str:
    """The tokenizer file of `path`: the file itself, or a folder's tokenizer.json (what AutoTokenizer
    reads first) else its tokenizer.model; "" when a folder has neither."""
    if os.path.isdir(path):
        for name in (HF_FILE, SP_FILE):
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        return ""
    return path


def is_hf(path: str) -> bool:
    return resolve(path).endswith(".json")


def file_name(path: str) -> str:
    """The name a copy of the tokenizer at `path` takes in a workdir (or an export)."""
    return HF_FILE if is_hf(path) else SP_FILE


def workdir_tokenizer(workdir: str) -> str:
    """A run's own tokenizer file in `workdir` (tokenizer.json or tokenizer.model; the latter when neither
    exists yet, the name a pretraining run writes)."""
    return resolve(workdir) or os.path.join(workdir, SP_FILE)


def _lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of `texts`, in order, until `max_bytes` of UTF-8 have been yielded."""
    total = 0
    for text in texts:
        for line in text.split("\n"):
            n = len(line.encode("utf-8"))
            if n == 0 or n > MAX_SENTENCE_BYTES:
                continue
            if total + n > max_bytes:
                return
            total += n
            yield line


def train(texts: Iterable[str], out_prefix: str, config: ml_collections.ConfigDict) -> Tokenizer:
    """Train a BPE model of exactly `config.model.vocab_size` pieces; writes `out_prefix`.model / .vocab."""
    t = config.tokenizer
    vocab_size = config.model.vocab_size
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, t.train_max_bytes),
        model_prefix=out_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        split_digits=t.split_digits,
        byte_fallback=t.byte_fallback,
        user_defined_symbols=list(t.user_defined_symbols),
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=TRAIN_THREADS,
        minloglevel=2,
    )
    tok = Tokenizer(out_prefix + ".model")
    if tok.vocab_size != vocab_size:
        raise RuntimeError(f"trained {tok.vocab_size} pieces, expected model.vocab_size={vocab_size}")
    return tok


def add_special_tokens(path: str, pieces: Iterable[str], out_path: str
                       ) -> tuple[Tokenizer | HFTokenizer, list[str]]:
    """Append `pieces` missing from the tokenizer at `path` as user-defined (never split) pieces,
    without retraining: existing ids and the encoding of text without the new pieces are unchanged, and
    each new piece gets the next id. Writes `out_path` atomically (only when something was added; otherwise
    the model at `path` is returned) -> (tokenizer, the pieces added).

    The new pieces are user-defined symbols, which SentencePiece matches before segmentation wherever
    they occur in the text -- the same treatment `tokenizer.user_defined_symbols` get at training time. A
    tokenizer.json gets them as special added tokens, which `tokenizers` matches the same way.
    """
    if is_hf(path):
        tok, pieces = HFTokenizer(resolve(path)), list(pieces)
        if not tok.missing(pieces):
            return tok, []
        added = tok.save_with(pieces, out_path)
        return load(out_path), added
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    present = {p.piece for p in proto.pieces}
    added = []
    for piece in pieces:
        if piece not in present:
            entry = proto.pieces.add()
            entry.piece, entry.score, entry.type = piece, 0.0, model_pb2.ModelProto.SentencePiece.USER_DEFINED
            present.add(piece)
            added.append(piece)
    if not added:
        return load(path), []
    _write_atomic(out_path, proto.SerializeToString())
    return load(out_path), added


def copy_model(source: str, target: str) -> None:
    """Copy a tokenizer file into place atomically (a run's workdir copy of its base's tokenizer); a
    tokenizer.json brings its tokenizer_config.json."""
    source = resolve(source)
    with open(source, "rb") as f:
        _write_atomic(target, f.read())
    if source.endswith(".json"):
        for name in (HF_CONFIG, HF_TEMPLATE):
            _copy_beside(source, target, name)


def export(source: str, folder: str) -> list[str]:
    """Copy the tokenizer at `source` (and its tokenizer_config.json) into an export `folder`; returns the
    names written."""
    name = file_name(source)
    copy_model(source, os.path.join(folder, name))
    return [name] + [beside for beside in (HF_CONFIG, HF_TEMPLATE)
                     if name == HF_FILE and os.path.exists(os.path.join(folder, beside))]


def _write_atomic(path: str, data: bytes) -> None:
    """Write through a uniquely named temporary file renamed into place: readers never see a partial file,
    and processes of a multi-host run writing the same file at once cannot collide on the temporary name."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".tokenizer-", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map every id to the same piece (so one model's token ids mean the same text
    under both); equal sizes alone do not say that."""
    return a.vocab_size == b.vocab_size and all(a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size))


def load(path: str) -> Tokenizer | HFTokenizer:
    """A SentencePiece `.model`, a Hugging Face `tokenizer.json`, or a folder holding one (tokenizer.json
    first, as AutoTokenizer reads it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer model at {path}")
    file = resolve(path)
    if not file:
        raise FileNotFoundError(f"no {HF_FILE} or {SP_FILE} in {path}")
    if file.endswith(".json"):
        return HFTokenizer(file)
    path = file
    try:
        return Tokenizer(path)
    except RuntimeError as e:  # sentencepiece's "could not parse ModelProto"
        raise InputError(f"{path} is not a SentencePiece tokenizer model ({' '.join(str(e).split())})") from None


def _checked(tok: Tokenizer, config: ml_collections.ConfigDict, origin: str) -> Tokenizer:
    if tok.vocab_size != config.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{config.model.vocab_size}, but the tokenizer {tok.path} ({origin}) has "
                          f"{tok.vocab_size} pieces; set them equal or use another workdir")
    return tok


def run_tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The tokenizer a training run in `workdir` used: `tokenizer.path` when set (and present, or when the
    workdir has none), else the workdir's own tokenizer (tokenizer.json or tokenizer.model)."""
    in_workdir = workdir_tokenizer(workdir)
    configured = config.tokenizer.path if "tokenizer" in config else ""
    if configured and (os.path.exists(configured) or not os.path.exists(in_workdir)):
        return configured
    return in_workdir


def load_or_train(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """`config.tokenizer.path`, else the workdir's cached `tokenizer.model`, else train and cache one.

    Training reads the *train* split of the configured data source in a fixed shuffled order (the cap of
    `tokenizer.train_max_bytes` then samples the whole corpus) and writes atomically, so concurrent hosts
    training the same deterministic model never see a half-written file.
    """
    if config.tokenizer.path:
        return _checked(load(config.tokenizer.path), config, "tokenizer.path")
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        return _checked(load(path), config, "cached in the workdir")

    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".tokenizer-") as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        train(data.iter_texts(data.make_source(config, "train")), prefix, config)
        os.replace(prefix + ".vocab", os.path.join(workdir, "tokenizer.vocab"))
        os.replace(prefix + ".model", path)
    return load(path)
