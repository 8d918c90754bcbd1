"""Tiny random-weight sentence-transformers models, built offline, for tests of the generic path.

``FIXTURES`` names each fixture's ``FixtureSpec``: what its model directory declares (pooling,
Normalize, prompts, ...) and the seed of its weights. ``spec.build(directory)`` writes that
directory in the layout ``SentenceTransformer.save()`` writes (it is written by that method, from
sentence-transformers' own module classes around a locally built transformers model and
tokenizer, so every config is genuine) and returns it::

    fixed word list / fixed corpus --tokenizers--> tokenizer (WordPiece or trained byte-level BPE)
    seeded torch init --transformers--> BertModel / MPNetModel / Qwen3Model (hidden 32, 2 layers)
        --> Transformer -> Pooling -> [Dense] -> [Normalize] --SentenceTransformer.save--> directory

Builds are deterministic (fixed seeds, fixed data), take seconds and a few hundred kB.
``FIXTURE_TEXTS`` are texts for parity tests, some longer than every fixture's
``max_seq_length``. torch, transformers, tokenizers and sentence-transformers are imported only
inside the builders.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FIXTURES", "FIXTURE_TEXTS", "FixtureSpec"]

HIDDEN = 32
"""Hidden size of every fixture: big enough that vectors of different texts differ clearly."""
LAYERS, HEADS = 2, 2
INITIALIZER_RANGE = 0.2
"""Wider than transformers' 0.02 so that random vectors of different texts are not all alike
(parity tests then notice a pooling that reads the wrong tokens)."""

_PUNCTUATION = list(".,;:!?'\"()[]{}-_/\\@#$%&*+=<>|~`^")
_WORD_LIST = (
    "a an the and or but if then else when while of to in on at by for with from into over "
    "under about after before between through during without within along across behind "
    "is are was were be been being has have had do does did can could will would shall should "
    "may might must not no yes all any some many much more most few less least each every "
    "i you he she it we they me him her us them my your his its our their this that these those "
    "what which who whom whose where why how here there now today tomorrow yesterday always never "
    "cat cats dog dogs fox bird birds fish horse mouse mat log tree trees river sea lake mountain "
    "city town house home room door window table chair bed book books paper letter word words "
    "text texts sentence sentences query queries passage passages document documents answer "
    "question questions search retrieve retrieval vector vectors embedding embeddings model "
    "models token tokens database index storage disk node nodes cluster server request reply "
    "time day night morning evening week year water fire earth air light dark sun moon star "
    "red green blue black white yellow small large big little long short old new young quick "
    "slow fast lazy brown happy sad good bad best worst high low hot cold warm open closed "
    "run runs ran jump jumps jumped walk walks sit sits sat eat eats read reads write writes "
    "find finds found give gives take takes make makes see sees look looks know knows think "
    "say says said tell tells ask asks work works play plays live lives stop stops start "
    "people person man woman child children friend family team engineer user users system "
    "systems data number numbers one two three four five six seven eight nine ten hundred "
    "first second last next same other different important simple hard easy true false "
    "computer network memory latency error errors alert shift report incident rack racks "
    "given instruct retrieve relevant about hello world test testing example examples"
)
_WORDS = _WORD_LIST.split()
_SPECIAL_WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SPECIAL_MPNET = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]
_SUFFIXES = ["##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##tion"]
_CHARACTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
_CAPITALS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
EOS_TOKEN = "<|endoftext|>"
"""Qwen3's end-of-text token: appended to every text by the post-processor, and the pad token."""
QWEN3_INSTRUCTION = "Instruct: Given a query, retrieve passages\nQuery: "


@dataclass(frozen=True)
class FixtureSpec:
    """One fixture: the seed its weights start from and what the built directory declares (by
    default mean pooling, Normalize and 32 tokens). ``build`` writes it with the builder of its
    ``architecture``, from these same fields."""

    architecture: str
    """"bert", "mpnet" or "qwen3": which builder writes it."""
    seed: int
    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int = 32
    dimension: int = HIDDEN
    """The sentence embedding's: another than ``HIDDEN`` puts a Dense module to it after pooling."""
    prompts: dict[str, str] = field(default_factory=dict)
    """The non-empty prompts. config_sentence_transformers.json may list empty ones as well
    (sentence-transformers 5+ writes "query": "" and "document": ""), which mean no prompt."""
    default_prompt_name: str | None = None
    include_prompt: bool = True
    lowercase: bool = False
    """Whether the tokenizer lowercases (tokenizer.json's normaliser and tokenizer_config.json's
    do_lower_case agree)."""
    padding_side: str = "right"
    refused: str | None = None
    """Why provisioning must refuse the model (a word the error must name), None when served."""

    def build(self, directory: Path) -> Path:
        """Writes the model directory and returns it."""
        return _BUILDERS[self.architecture](directory, self)


def _sentences(seed: int, count: int, low: int, high: int) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(low, high))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        text = " ".join(words)
        if rng.random() < 0.5:
            text += rng.choice([".", "!", "?", "...", ";"])
        if rng.random() < 0.2:
            position = rng.randrange(len(text) + 1)
            text = text[:position] + rng.choice([", ", " (", ") ", " - ", ": "]) + text[position:]
        sentences.append(text)
    return sentences


def _fixture_texts() -> list[str]:
    rng = random.Random(20240601)
    short = _sentences(1, 200, 1, 12)
    medium = _sentences(2, 60, 12, 30)
    long_texts = [" ".join(_sentences(3 + i, 12, 8, 16)) for i in range(24)]
    special = [
        "",
        " ",
        "   \t\n  ",
        "  leading and trailing spaces  ",
        "\ttabbed\ttext\n",
        "The QUICK Brown Fox Jumps over the LAZY dog",
        "ALL CAPITALS HERE",
        "Hello, world! (Really?) [yes] {no} -- \"quoted\" 'single'",
        "a.b,c;d:e!f?g",
        "...!!!???",
        "café naïve résumé façade",
        "Grüße aus Köln, schöne Straße",
        "日本語のテキストです",
        "emoji 🙂 and symbols © ® ™",
        "Ελληνικά και русский текст",
        "x",
        "the",
        "query: what is a vector database?",
        "passage: a vector database stores embeddings",
        "Instruct: Given a query, retrieve passages\nQuery: find the cat",
    ]
    texts = [*short, *medium, *long_texts, *special]
    rng.shuffle(texts)
    return texts


FIXTURE_TEXTS: list[str] = _fixture_texts()
"""A few hundred texts: short, medium, long (past every fixture's max_seq_length), empty,
whitespace only or padded, mixed case, punctuation, non-ASCII. Deterministic."""


def _modules() -> Any:
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models as modules  # type: ignore[attr-defined,no-redef]
    return modules


def _tokenizer_class(name: str) -> Any:
    """A tokenizers-backed tokenizer class of transformers (4.x and 5.x both export the *Fast
    names; in 5.x they are the only kind)."""
    import transformers

    return getattr(transformers, name)


def _wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    tokens = [
        *specials,
        *_PUNCTUATION,
        *_CHARACTERS,
        *_CAPITALS,
        *(f"##{c}" for c in _CHARACTERS),
        *_SUFFIXES,
        *_WORDS,
        *(word.capitalize() for word in _WORDS[:80]),
    ]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


_SHARED_SIZES: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "intermediate_size": 2 * HIDDEN,
    "initializer_range": INITIALIZER_RANGE,
}
"""What the transformers config of every fixture holds alike."""


def _save_sentence_transformer(
    directory: Path,
    spec: FixtureSpec,
    tokenizer: Any,
    model_class: Any,
    config: Any,
    *,
    do_lower_case: bool = False,
) -> Path:
    """The seeded ``model_class(config)`` and ``tokenizer`` in the module chain ``spec`` states,
    saved by ``SentenceTransformer.save`` to ``directory``. ``do_lower_case`` is the
    Transformer module's own (it puts a Lowercase in front of the tokenizer's normaliser)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    modules = _modules()
    torch.manual_seed(spec.seed)
    raw_model = model_class(config)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="st-fixture-") as raw:
        raw_model.save_pretrained(raw)
        tokenizer.save_pretrained(raw)
        transformer = modules.Transformer(
            raw, max_seq_length=spec.max_seq_length, do_lower_case=do_lower_case
        )
        pooling = modules.Pooling(
            HIDDEN, pooling_mode=spec.pooling, include_prompt=spec.include_prompt
        )
        chain: list[Any] = [transformer, pooling]
        if spec.dimension != HIDDEN:
            torch.manual_seed(spec.seed + 1)
            chain.append(modules.Dense(HIDDEN, spec.dimension))
        if spec.normalize:
            chain.append(modules.Normalize())
        model = SentenceTransformer(
            modules=chain,
            device="cpu",
            prompts=dict(spec.prompts),
            default_prompt_name=spec.default_prompt_name,
        )
        model.save(str(directory))
    return directory


def _wordpiece_encoder(directory: Path, spec: FixtureSpec) -> Path:
    """BERT, or MPNet (no token_type_ids), over the fixed WordPiece vocabulary."""
    import transformers

    bert = spec.architecture == "bert"
    family = "Bert" if bert else "MPNet"
    vocab = _wordpiece_vocab(_SPECIAL_WORDPIECE if bert else _SPECIAL_MPNET)
    # The tokenizer itself lowercases when the fixture does: transformers 5 rebuilds a BERT
    # tokenizer's normaliser from tokenizer_config.json's do_lower_case on load, so a Lowercase
    # that sentence-transformers' do_lower_case adds only to tokenizer.json would be lost.
    tokenizer = _tokenizer_class(f"{family}TokenizerFast")(
        vocab=vocab, do_lower_case=spec.lowercase
    )
    if bert:
        own = {"max_position_embeddings": 64, "type_vocab_size": 2, "pad_token_id": vocab["[PAD]"]}
    else:
        own = {
            "max_position_embeddings": 64 + 2,  # positions start after the padding index
            "pad_token_id": vocab["<pad>"],
            "bos_token_id": vocab["<s>"],
            "eos_token_id": vocab["</s>"],
        }
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(vocab), num_attention_heads=HEADS, **own, **_SHARED_SIZES
    )
    model_class = getattr(transformers, f"{family}Model")
    # The lowercasing BERT fixtures take sentence-transformers' do_lower_case as well, so that
    # a tokenizer.json with the Lowercase it adds is served too (MPNet's has none).
    return _save_sentence_transformer(
        directory, spec, tokenizer, model_class, config, do_lower_case=bert and spec.lowercase
    )


def _bpe_corpus() -> list[str]:
    corpus = _sentences(31, 400, 3, 20)
    corpus += [QWEN3_INSTRUCTION + sentence for sentence in _sentences(32, 40, 3, 10)]
    corpus += [sentence.upper() for sentence in _sentences(33, 40, 2, 8)]
    return corpus


def _byte_level_tokenizer(spec: FixtureSpec) -> Any:
    """A byte-level BPE trained on ``_bpe_corpus`` with Qwen2's normaliser and pre-tokeniser (the
    ones transformers' Qwen2Tokenizer rebuilds on load), appending <|endoftext|> to every text."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=640,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_bpe_corpus(), trainer=trainer)
    trained = json.loads(backend.to_str())["model"]
    tokenizer = _tokenizer_class("Qwen2TokenizerFast")(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side=spec.padding_side,
        model_max_length=spec.max_seq_length,
    )
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(EOS_TOKEN, tokenizer.convert_tokens_to_ids(EOS_TOKEN))],
    )
    return tokenizer


def _qwen3_decoder(directory: Path, spec: FixtureSpec) -> Path:
    """A Qwen3 decoder over a trained byte-level BPE appending <|endoftext|> to every text."""
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = _byte_level_tokenizer(spec)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        # No pad id: the embedding row of a pad id is zeroed at init, and the pad token here is
        # <|endoftext|>, which ends every text (the empty text would embed to a zero vector).
        pad_token_id=None,
        tie_word_embeddings=False,
        use_cache=False,
        **_SHARED_SIZES,
    )
    return _save_sentence_transformer(directory, spec, tokenizer, Qwen3Model, config)


_BUILDERS: dict[str, Callable[[Path, FixtureSpec], Path]] = {
    "bert": _wordpiece_encoder,
    "mpnet": _wordpiece_encoder,
    "qwen3": _qwen3_decoder,
}

FIXTURES: dict[str, FixtureSpec] = {
    # BERT, WordPiece, CLS pooling, Normalize, lowercasing.
    "bert_cls": FixtureSpec("bert", 11, pooling="cls", lowercase=True),
    # BERT, cased WordPiece, max pooling, no Normalize.
    "bert_max": FixtureSpec("bert", 12, pooling="max", normalize=False, max_seq_length=24),
    # MPNet, mean pooling without the prompt's tokens, no Normalize, two prompts and no default.
    "mpnet_prompts": FixtureSpec(
        "mpnet",
        21,
        normalize=False,
        max_seq_length=40,
        prompts={"query": "query: ", "passage": "passage: "},
        include_prompt=False,
        lowercase=True,
    ),
    # Qwen3 decoder, left padding, last-token pooling, Normalize, an instruction prompt.
    "qwen3_lasttoken": FixtureSpec(
        "qwen3",
        41,
        pooling="lasttoken",
        max_seq_length=48,
        prompts={"query": QWEN3_INSTRUCTION},
        padding_side="left",
    ),
    # BERT, mean pooling, Dense 32 -> 16, Normalize: a chain provisioning must refuse.
    "bert_dense": FixtureSpec("bert", 13, dimension=16, lowercase=True, refused="Dense"),
}
"""Every fixture by name."""
