"""A tiny byte-level BPE tokenizer in the official Dia2 file layout, for tests and random checkpoints.

The released tokenizer is a byte-level BPE with a 49152-entry base vocabulary, `[S1]`/`[S2]`
added right after it, and BOS id 0. This one keeps the same shape at toy size: ids 0…7 are
special tokens (2 = new_word, 3 = pad and 7 = zero line up with the ids Dia2's config uses),
the base vocabulary is trained on a small built-in English text, `[S1]` and `[S2]` follow it,
and the BOS token is id 0, so the runtime's "BOS 0 means 1" rule is exercised too.

Training is deterministic: the same files, byte for byte, on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# Ids 0…7, in order. Only their positions matter to Dia2; names are descriptive.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # 0: bos/eos/unk, like the released tokenizer (BOS id 0)
    "<|bos|>",  # 1: the id the runtime feeds as BOS
    "<new_word>",  # 2: data.text_new_word_token_id
    "<pad>",  # 3: data.text_pad_token_id
    "<|reserved_4|>",
    "<|reserved_5|>",
    "<|reserved_6|>",
    "<zero>",  # 7: data.text_zero_token_id
)
SPEAKER_TOKENS: tuple[str, str] = ("[S1]", "[S2]")
# Base vocabulary (special tokens + 256 bytes + merges); the two speaker tags come after it.
BASE_VOCAB_SIZE = 480

_CORPUS = """\
Hello there, and thank you for calling. How can I help you today?
Hello! Yes, I would like to change the time of my appointment, please.
Of course. Let me look that up for you. Can you give me your name and your date of birth?
My name is Alex Morgan, and I was born on the third of May, nineteen ninety two.
Thank you, Alex. I can see your appointment on Tuesday at ten in the morning.
Would you like to move it to another day, or just to a later time on Tuesday?
A later time would be great. Is there anything after two in the afternoon?
Let me check. We have three thirty or four fifteen. Which one works better for you?
Four fifteen works for me. Thank you so much for your help.
You are welcome. I have moved your appointment to four fifteen on Tuesday.
You will get a text message with the new time in a few minutes.
Is there anything else I can help you with today?
No, that is all. Have a good day!
You too. Goodbye, and thanks again for calling.
The weather today is sunny and warm, with a light wind from the west.
Tomorrow it will be cloudy, and there may be some rain in the evening.
We open at nine in the morning and close at six in the evening, Monday to Friday.
On Saturday we are open from ten until two. We are closed on Sunday.
Please hold the line for a moment while I connect you to the right person.
I am sorry, I did not catch that. Could you say it again, a little more slowly?
Sure. The order number is one two three four five six seven eight nine zero.
Great, I found your order. It was shipped yesterday and should arrive on Friday.
If it does not arrive by then, please call us back and we will send a new one.
Our address is twenty one Market Street, and the office is on the second floor.
You can also reach us by email, or through the website, at any time of day.
Well, I think that covers everything. It was nice talking to you. Take care!
She said Hello to me, and I said Hello back. Say Hello to your family for me.
"""


def _train() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus only scales the pair counts; it keeps merge ties rare.
    tok.train_from_iterator(_CORPUS.splitlines() * 3, trainer=trainer)
    # Added (not special) tokens: recognised in text, never stripped of the following space.
    tok.add_tokens(
        [
            AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False)
            for t in SPEAKER_TOKENS
        ]
    )
    return tok


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def write_tiny_tokenizer(out_dir: Path) -> int:
    """Write the tiny tokenizer's six files into ``out_dir``; return the total vocabulary size.

    Files: ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``,
    ``special_tokens_map.json``, ``added_tokens.json`` (the set the released repos ship).
    The total counts the added speaker tags and is at most 512.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train()
    base_size = tok.get_vocab_size(with_added_tokens=False)
    total = tok.get_vocab_size(with_added_tokens=True)
    speaker_ids = {t: tok.token_to_id(t) for t in SPEAKER_TOKENS}
    assert speaker_ids == {t: base_size + i for i, t in enumerate(SPEAKER_TOKENS)}, speaker_ids
    assert total == base_size + len(SPEAKER_TOKENS) <= 512, (base_size, total)

    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    # vocab.json + merges.txt: the base model only, as GPT-2 style repos ship them.
    tok.model.save(str(out_dir))

    added_decoder: dict[str, dict[str, object]] = {}
    for i, name in enumerate(SPECIAL_TOKENS):
        added_decoder[str(i)] = _added_entry(name, special=True)
    for name, idx in speaker_ids.items():
        added_decoder[str(idx)] = _added_entry(name, special=False)
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "added_tokens_decoder": added_decoder,
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[0],
            "unk_token": SPECIAL_TOKENS[0],
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0], "unk_token": SPECIAL_TOKENS[0]},
    )
    _write_json(out_dir / "added_tokens.json", speaker_ids)
    return total


def _added_entry(content: str, *, special: bool) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }
