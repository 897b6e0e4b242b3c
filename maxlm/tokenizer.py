"""Tokenizers: SentencePiece BPE trained on the project's own corpus with LLaMA / Baichuan 2 choices, and
the Hugging Face `tokenizer.json` of today's open weights (Llama 3, Qwen, Mistral, Gemma) read with the
`tokenizers` library -- the reference implementation `AutoTokenizer` wraps. `load(path)` takes either file
(or a folder holding one) and returns an object with one interface: `encode` / `decode` (no bos/eos added:
the caller frames text itself), the bos / eos / pad ids, `vocab_size`, `piece_to_id` / `id_to_piece`, and
`add_bos`: whether text is framed with bos at all. Qwen's tokenizers have no bos, GPT-2's have one they never
add; every scorer, sampler and the packer frame text with `text_prefix(tok)` (and score a document's first
token after `score_prefix_id(tok)`), so a model is fed what `AutoTokenizer` -- and lm-evaluation-harness
on top of it -- feeds it.

`export(source, folder)` writes what `AutoTokenizer` needs to reproduce those ids with no extra flags: a
run's tokenizer.json as it is, or, for a SentencePiece run, its tokenizer.model plus a tokenizer.json built
from it here with the `tokenizers` library (`sentencepiece_to_json`: fast, and readable without protobuf,
which transformers' own conversion of a .model needs), a tokenizer_config.json (`write_hf_config`, the one
writer, which also takes a chat template), special_tokens_map.json, and the token ids in config.json.

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
from maxlm.data import chat_hf, records
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
        self._special: frozenset[int] | None = None

    def encode(self, text: str) -> list[int]:
        if self._meta_ids is None or _META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(_META)):
            if k:
                ids += self._meta_ids
            ids += self._sp.encode(part)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (control pieces dropped); `skip_special` also drops the user-defined pieces (chat
        markers), which the exported tokenizer.json marks special, as `AutoTokenizer.decode(...,
        skip_special_tokens=True)` -- and so lm-evaluation-harness's generations -- drop them."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._sp.decode(ids)

    @property
    def special_ids(self) -> frozenset[int]:
        """Control, unknown and user-defined pieces: the special tokens of the exported tokenizer.json."""
        if self._special is None:
            types = _piece_types(self._path)
            self._special = frozenset(i for i, t in enumerate(types) if t in _SP_SPECIAL_TYPES)
        return self._special

    @property
    def add_bos(self) -> bool:
        """A SentencePiece model with a bos piece frames every text with it (LLaMA's convention)."""
        return self.bos_id >= 0

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
        config = _read_config(os.path.join(os.path.dirname(os.path.abspath(path)), HF_CONFIG))
        special = chat_hf.special_tokens(config)
        self._ids = {name: (self._tok.token_to_id(token) if token else None) for name, token in special.items()}
        for name, token in special.items():
            if token and self._ids[name] is None:
                raise InputError(f"{path}: {HF_CONFIG} names {name}_token {token!r}, which is not in the vocabulary")
        self._control = {i for i in self._ids.values() if i is not None}
        self._add_bos = self._frames_with_bos()

    def _frames_with_bos(self) -> bool:
        """Whether `AutoTokenizer` puts bos before a text: what tokenizer.json's post-processor does (the
        generic fast class of transformers 5 goes by it, not by tokenizer_config.json's `add_bos_token`,
        which the files maxlm writes keep equal to it); never without a bos token (Qwen)."""
        if self._ids["bos"] is None:
            return False
        framed = self._tok.encode("a", add_special_tokens=True).ids
        return len(framed) > len(self.encode("a")) and framed[0] == self._ids["bos"]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, the [start, end) character span of `text` each id came from) -- how a chat template's
        rendered text is mapped back to trained tokens."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` without bos / eos / pad; `skip_special` also drops every other special added token
        (chat markers), as `AutoTokenizer.decode(..., skip_special_tokens=True)` does."""
        drop = self.special_ids if skip_special else self._control
        return self._tok.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

    @property
    def special_ids(self) -> frozenset[int]:
        """The special added tokens, and bos / eos / pad."""
        added = self._tok.get_added_tokens_decoder()
        return frozenset({i for i, t in added.items() if t.special} | self._control)

    @property
    def add_bos(self) -> bool:
        return self._add_bos

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


def _read_config(config_path: str) -> dict:
    """A tokenizer_config.json as a dict ({} when there is none)."""
    return records.read_json_object(config_path) if os.path.exists(config_path) else {}


def text_prefix(tok: Tokenizer | HFTokenizer) -> list[int]:
    """The ids every text starts with: [bos] when the tokenizer frames text with it, else none (Qwen; GPT-2).
    What `AutoTokenizer(text)` puts first, so maxlm's scores and generations equal lm-evaluation-harness's."""
    add = getattr(tok, "add_bos", None)
    if add is None:  # a tokenizer-like object without the attribute (a test double): frame when it has a bos
        add = tok.bos_id is not None and tok.bos_id >= 0
    return [tok.bos_id] if add else []


def score_prefix_id(tok: Tokenizer | HFTokenizer) -> int:
    """The token a document's first token is scored after: bos when the tokenizer has one, else eos -- what
    precedes a document in a packed stream without bos, and lm-evaluation-harness's `prefix_token_id`."""
    for i in (tok.bos_id, tok.eos_id):
        if i is not None and i >= 0:
            return i
    raise InputError(f"the tokenizer {getattr(tok, 'path', '')} has neither a bos nor an eos token to score a "
                     "document's first token after")


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


SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# SentencePiece piece types (sentencepiece_model.proto): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
# BYTE 6, UNUSED 5. The exported tokenizer.json makes unknown, control and user-defined pieces special added
# tokens: matched whole before segmentation (as SentencePiece matches user-defined symbols), never split.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER = 1, 2, 3, 4
_SP_SPECIAL_TYPES = (_SP_UNKNOWN, _SP_CONTROL, _SP_USER)


def _model_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _piece_types(path: str) -> list[int]:
    return [p.type for p in _model_proto(path).pieces]


def sentencepiece_to_json(path: str) -> str:
    """A Hugging Face tokenizer.json equal to the SentencePiece BPE model at `path` (ids of every text, bos
    framing, decoding), built with the `tokenizers` library.

    Why not leave the .model to transformers: `AutoTokenizer` converts a .model at every load, only with
    protobuf installed, and without a tokenizer_config.json it falls back to a generic class that adds no
    bos. The conversion is the one transformers' Llama converter makes: the model's vocabulary with merges
    regenerated from it (a piece's merges ranked by its id: SentencePiece BPE numbers pieces in merge
    order), byte fallback, spaces as U+2581 with no dummy prefix (unless the model has one), and the unknown,
    control and user-defined pieces (bos, eos, pad, chat markers) as special added tokens. A post-processor
    prepends bos, as maxlm frames every text. One difference is inherent: maxlm's `Tokenizer.encode` sends a
    literal U+2581 in the text as its UTF-8 bytes (so it decodes back to itself), while any tokenizer.json
    reads it as a space.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as _Tokenizer

    proto = _model_proto(path)
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 bpe, 3 word, 4 char
        raise InputError(f"{path}: only SentencePiece BPE models convert to tokenizer.json (this one has model "
                         f"type {proto.trainer_spec.model_type})")
    pieces = [(p.piece, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    mergeable = {piece for piece, kind in pieces if kind == _SP_NORMAL}
    merges = []
    for piece, kind in pieces:
        if kind != _SP_NORMAL or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in mergeable and piece[k:] in mergeable]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    unk = proto.trainer_spec.unk_piece if proto.trainer_spec.unk_id >= 0 else None
    tok = _Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                byte_fallback=proto.trainer_spec.byte_fallback))
    norm = proto.normalizer_spec
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps) if steps else None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="first" if norm.add_dummy_prefix
                                                 else "never", split=False)
    steps = [decoders.Replace(_META, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece, kind in pieces
                            if kind in _SP_SPECIAL_TYPES])
    if proto.trainer_spec.bos_id >= 0:
        bos = proto.trainer_spec.bos_piece
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, vocab[bos])])
    return tok.to_str()


def write_hf_config(folder: str, tok: Tokenizer | HFTokenizer, *, chat_template: str | None = None,
                    model_max_length: int | None = None) -> list[str]:
    """Write `folder`/tokenizer_config.json and special_tokens_map.json for `tok` -> the names written.

    The one writer of both files, so what decides AutoTokenizer's behaviour is set in one place: a
    tokenizer_config.json already in `folder` (copied from a tokenizer.json run) is kept and only completed;
    otherwise one is made for the tokenizer.json `export` writes beside it: the generic fast class (which
    takes tokenizer.json as written, in transformers 4 and 5 alike -- LlamaTokenizer would rebuild the
    pre-tokenizer with a dummy prefix, or reconvert the .model), `add_bos_token` / `add_eos_token` as maxlm
    frames text (bos first, never eos: transformers 5 rebuilds the post-processor from these), the bos / eos /
    unk / pad tokens and the special added tokens (chat markers). `chat_template` (a Jinja string), when
    given, becomes the `chat_template` field AutoTokenizer's `apply_chat_template` reads."""
    path = os.path.join(folder, HF_CONFIG)
    cfg = _read_config(path)
    names = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id}
    tokens = {name: tok.id_to_piece(i) if i is not None and 0 <= i < tok.vocab_size else None
              for name, i in names.items()}
    markers = sorted(tok.special_ids - {i for i in names.values() if i is not None and i >= 0})
    extra = [tok.id_to_piece(i) for i in markers]
    if not cfg:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos, "add_eos_token": False,
               "clean_up_tokenization_spaces": False,
               **{f"{name}_token": token for name, token in tokens.items()}, "additional_special_tokens": extra}
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    _write_atomic(path, (json.dumps(cfg, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    written = [HF_CONFIG]
    map_path = os.path.join(folder, SPECIAL_TOKENS_MAP)
    if not os.path.exists(map_path):
        special_map = {f"{name}_token": token for name, token in tokens.items() if token is not None}
        if extra:
            special_map["additional_special_tokens"] = extra
        _write_atomic(map_path, (json.dumps(special_map, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    written.append(SPECIAL_TOKENS_MAP)
    return written


def write_model_token_ids(folder: str, tok: Tokenizer | HFTokenizer) -> None:
    """Set bos / eos / pad ids in `folder`/config.json (when there is one): transformers' generation stops at
    the config's eos_token_id, and LlamaConfig's defaults (bos 1, eos 2) are not maxlm's ids."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        cfg[f"{name}_token_id"] = i if i is not None and i >= 0 else None
    _write_atomic(path, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def export(source: str, folder: str, *, chat_template: str | None = None, model_max_length: int | None = None
           ) -> list[str]:
    """Write the tokenizer at `source` into an export `folder` so that `AutoTokenizer.from_pretrained(folder)`
    gives maxlm's ids, bos framing included, with no extra arguments; returns the names written.

    A tokenizer.json run's files are copied as they are (its tokenizer_config.json and special_tokens_map.json
    too: `HFTokenizer` reads bos framing from the same files AutoTokenizer does). A SentencePiece run gets its
    tokenizer.model (for sentencepiece users) and the tokenizer.json `sentencepiece_to_json` builds from it.
    Both get tokenizer_config.json through `write_hf_config` (`chat_template`, `model_max_length`) and their
    token ids in config.json when the folder holds a model."""
    name = file_name(source)
    source = resolve(source)
    if os.path.dirname(os.path.abspath(source)) != os.path.abspath(folder):
        for stale in (HF_FILE, SP_FILE, HF_CONFIG, SPECIAL_TOKENS_MAP, HF_TEMPLATE):  # an earlier export's
            if os.path.exists(os.path.join(folder, stale)):
                os.remove(os.path.join(folder, stale))
    copy_model(source, os.path.join(folder, name))
    written = [name]
    if name == HF_FILE:
        _copy_beside(source, os.path.join(folder, name), SPECIAL_TOKENS_MAP)
        written += [HF_TEMPLATE] if os.path.exists(os.path.join(folder, HF_TEMPLATE)) else []
    else:
        _write_atomic(os.path.join(folder, HF_FILE), sentencepiece_to_json(source).encode("utf-8"))
        written.append(HF_FILE)
    tok = load(os.path.join(folder, name))
    written += write_hf_config(folder, tok, chat_template=chat_template, model_max_length=model_max_length)
    write_model_token_ids(folder, tok)
    return written


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
