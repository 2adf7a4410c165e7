"""Deterministic generator for the shipped demo assets (corpus, chat file, tokenizer).

`python -m trainer.data.demo [--out configs/demo]` rewrites configs/demo/{corpus.jsonl, chat.jsonl,
tokenizer/}. The text comes from a small seeded grammar with a few hundred words and fixed "facts",
so a tiny model's loss falls visibly within ~100 steps while documents still vary in length (a few
are longer than typical demo sequence lengths, which exercises splitting across sequences).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_DOCS = 3000
N_CHAT = 50
VOCAB_SIZE = 768
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]

# Assistant content sits inside {% generation %} so apply_chat_template can return the assistant mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

ANIMALS = "cat dog fox owl bird horse rabbit mouse bear frog duck goat lion wolf deer".split()
NAMES = "anna ben clara dan eva finn greta hugo iris jack kim leo maya nora omar paul rosa sam tara".split()
COLORS = "red blue green yellow black white brown orange purple grey".split()
SIZES = "small big tiny huge little tall short old young quiet".split()
THINGS = "ball box book cup hat kite lamp key boat apple bell chair coin drum map".split()
PLACES = "garden forest river kitchen market school park house field village hill lake".split()
VERBS = "saw found liked took lost wanted painted carried opened dropped".split()
FEELINGS = "happy sad tired curious angry calm proud hungry sleepy brave".split()
TIMES = "in the morning|at noon|in the evening|at night|on monday|after lunch|before dinner".split("|")
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()

# Fixed facts: the same question always has the same answer, which a small model can memorise.
HOMES = {a: PLACES[i % len(PLACES)] for i, a in enumerate(ANIMALS)}
FAVOURITE = {n: COLORS[(3 * i) % len(COLORS)] for i, n in enumerate(NAMES)}


def _np(rng: random.Random) -> str:
    """A noun phrase: 'the small red ball' / 'a fox' / 'anna'."""
    r = rng.random()
    if r < 0.25:
        return rng.choice(NAMES)
    det = rng.choice(["the", "a"])
    words = [det]
    if rng.random() < 0.5:
        words.append(rng.choice(SIZES))
    if rng.random() < 0.5:
        words.append(rng.choice(COLORS))
    words.append(rng.choice(ANIMALS if r < 0.6 else THINGS))
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        s = f"{_np(rng)} {rng.choice(VERBS)} {_np(rng)} in the {rng.choice(PLACES)}"
    elif kind == 1:
        s = f"{_np(rng)} was {rng.choice(FEELINGS)} {rng.choice(TIMES)}"
    elif kind == 2:
        a = rng.choice(ANIMALS)
        s = f"the {a} lives in the {HOMES[a]}"
    elif kind == 3:
        n = rng.choice(NAMES)
        s = f"the favourite color of {n} is {FAVOURITE[n]}"
    elif kind == 4:
        start = rng.randrange(len(NUMBERS) - 4)
        s = "we counted " + " ".join(NUMBERS[start : start + rng.randint(3, 5)])
    elif kind == 5:
        s = f"{_np(rng)} {rng.choice(VERBS)} {_np(rng)} and then {rng.choice(VERBS)} {_np(rng)}"
    else:
        s = f"{rng.choice(TIMES)} {_np(rng)} went to the {rng.choice(PLACES)}"
    return s[0].upper() + s[1:] + "."


def _document(rng: random.Random) -> str:
    # Heavy-tailed length: most documents are a few sentences, a few run to hundreds.
    n = max(1, min(400, int(rng.lognormvariate(1.6, 1.0))))
    sentences = [_sentence(rng) for _ in range(n)]
    paragraphs, i = [], 0
    while i < n:
        step = rng.randint(2, 6)
        paragraphs.append(" ".join(sentences[i : i + step]))
        i += step
    return "\n\n".join(paragraphs)


def make_corpus(n_docs: int = N_DOCS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n_docs)]


def make_chat(n_rows: int = N_CHAT, seed: int = SEED + 1) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You answer questions about the little world."})
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                a = rng.choice(ANIMALS)
                q, ans = f"Where does the {a} live?", f"The {a} lives in the {HOMES[a]}."
            else:
                n = rng.choice(NAMES)
                q, ans = f"What is the favourite color of {n}?", f"It is {FAVOURITE[n]}."
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        rows.append(messages)
    return rows


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Byte-level BPE with <bos>/<eos>/<pad> and role tokens; saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No post-processor: the data pipeline adds BOS/EOS itself (data.add_bos / data.add_eos).
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out: str | Path = "configs/demo") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = make_corpus()
    chats = make_chat()
    _write_jsonl(out / "corpus.jsonl", [{"text": d} for d in docs])
    _write_jsonl(out / "chat.jsonl", [{"messages": m} for m in chats])
    chat_text = [m["content"] for c in chats for m in c]
    train_tokenizer(docs + chat_text, out / "tokenizer")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="configs/demo", help="output directory")
    args = parser.parse_args()
    out = generate(args.out)
    size = (out / "corpus.jsonl").stat().st_size
    print(f"wrote {out}/corpus.jsonl ({size / 1e6:.2f} MB), {out}/chat.jsonl, {out}/tokenizer/")


if __name__ == "__main__":
    main()
