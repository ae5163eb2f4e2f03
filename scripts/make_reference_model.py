"""Build llmslim's embedded reference model (llmslim/assets/reference/) from nothing but this file.

    .venv/bin/python scripts/make_reference_model.py                  # the shipped model (~25 min, 2 cores)
    .venv/bin/python scripts/make_reference_model.py --quick          # smoke test: 50 steps, temp dir

Why: the demo and the quality tests must run offline on a fresh machine, so the repo carries a small
Llama trained here, on English the script writes itself (no third-party text, no Hub):
  1. a stochastic grammar writes children's stories: named characters and a named town that come back
     later in the story (so predicting them needs attention over the context), objects with colours,
     short dialogues, pronouns that agree with the character. Train, calibration and evaluation text
     come from different seeds, and held-out stories that also occur in the training text are dropped.
  2. a byte-level BPE tokenizer (2048 ids, <unk>=0 <s>=1 </s>=2, BOS prepended like Llama);
  3. a 6-layer LlamaForCausalLM (hidden 128, 4 query / 2 KV heads of 32, FFN 384, tied embeddings),
     trained with AdamW and warmup + cosine on 256-token windows, on the CPU;
  4. bf16 safetensors + config + tokenizer + calib.txt + eval.txt + a model card, then the held-out
     perplexity in float32 (non-overlapping 256-token windows over eval.txt, as `llmslim` measures it).

Everything is seeded: the same command rebuilds the same text, tokenizer and (on the same torch build and
thread count) the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # keep the tokenizer from spawning threads

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "llmslim" / "assets" / "reference"
SEQ_LEN = 256
VOCAB = 2048
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (Llama's convention)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ grammar
# Word lists are wide on purpose: each random choice is entropy the model cannot memorise, which keeps
# the perplexity well above 1, and names drawn from ~150 per story can only be predicted on their second
# mention by looking back at the first (induction / copying through attention).

GIRLS = """Lily Mia Emma Sara Anna Lucy Zoe Ella Ruby Rosa Nora Ivy Maya Chloe Amy Jade Grace Hannah Clara
Alice Daisy Molly Sophie Ava Lena Nina Tessa Wendy Olive Hazel Iris Poppy Violet Freya Luna Bella Kate
Julia Elsie Fiona Greta Heidi Jenny Laura Mila Nell Paula Rita""".split()
BOYS = """Tom Max Ben Sam Leo Jack Finn Noah Luke Adam Oscar Theo Hugo Eli Omar Ravi Kai Milo Owen Jake
Toby Henry Oliver Felix Arlo Ezra Ivan Jonah Liam Mark Nate Otto Paul Reed Simon Tim Victor Will Zane Dan
Caleb Dylan Ethan Gabe Isaac Joel Kevin Louis Marco Peter""".split()
PET_NAMES = """Spot Fluffy Pip Bubbles Coco Patch Biscuit Pepper Socks Muffin Button Ziggy Rusty Shadow
Sunny Tiny Bingo Daisy Nibbles Pebble Whiskers Jelly Maple Tuffy Snowy Dotty Bramble Twig Acorn Hopper""".split()
ANIMALS = "cat dog bunny fox bear mouse duck frog owl puppy kitten squirrel hedgehog pony turtle bird".split()
KID_ADJ = "little small brave kind shy happy curious clever cheerful quiet funny gentle young busy".split()
ANIMAL_ADJ = "little fluffy small brown gray white spotted fast sleepy friendly tiny old clever soft".split()
# Town names are built from two halves, so most of them are rare and span several BPE tokens.
TOWN_A = "Apple Maple Willow Sunny River Green Stone Honey Berry Oak Pine Clover Silver Rose Fox Bright".split()
TOWN_B = "wood ton field brook hill vale dale ford bay wick".split()
PLACES = ["a small house near the woods", "a big house on a hill", "a little cottage by the sea",
          "a quiet farm", "a busy street", "a tall tree house", "a cozy flat above a bakery",
          "a house with a red door", "a blue boat on a lake", "a tent in the forest"]
GO_PLACES = ["the park", "the beach", "the forest", "the garden", "the lake", "the farm", "the market",
             "the library", "the zoo", "the river", "the hill", "the playground", "the school", "the pond",
             "the meadow", "the shop", "the old castle", "the big field"]
COLORS = "red blue green yellow pink purple orange white black brown gold silver".split()
OBJ_ADJ = "shiny big small soft old new round funny pretty tiny heavy magic".split()
OBJECTS = ["ball", "kite", "hat", "box", "boat", "book", "drum", "cup", "doll", "car", "shell", "key",
           "train", "balloon", "blanket", "bucket", "crayon", "flower", "bell", "rock", "robot", "teddy bear",
           "umbrella", "scarf", "map", "wagon", "button", "ring"]
LOSE_SPOTS = ["under the bed", "behind the sofa", "in the tall grass", "up in a tree", "in the mud",
              "under a big rock", "in the river", "on the roof", "in a hole", "behind the fence",
              "in a pile of leaves", "under the table"]
GAMES = ["played tag", "played hide and seek", "built a sand castle", "drew pictures", "sang songs",
         "jumped in puddles", "picked flowers", "read a book", "baked cookies", "flew a kite",
         "rode their bikes", "played ball", "made a snowman", "danced in the sun", "looked for bugs",
         "built a tower of blocks", "had a tea party", "counted the stars", "played with toy cars"]
FOODS = ["apples", "cookies", "a cake", "soup", "bread", "cherries", "pancakes", "a pie", "carrots",
         "grapes", "sandwiches", "ice cream", "muffins", "berries", "honey"]
FEEL_GOOD = "happy glad proud excited calm thankful".split()
FEEL_BAD = "sad scared worried angry upset lonely".split()
WEATHER = ["The sun was shining.", "It was a rainy day.", "Snow was falling.", "The wind was blowing.",
           "The sky was blue and clear.", "It was very hot.", "It was a cold morning.", "Dark clouds filled the sky."]
TIMES = ["One day", "One morning", "One sunny day", "On Monday", "On Saturday", "One evening", "In the spring",
         "In the summer", "One winter day", "After lunch", "Early in the morning", "Later that day"]
OPENINGS = ["Once upon a time, there was", "Long ago, there lived", "Once upon a time, there lived",
            "In a land far away, there was", "Not long ago, there was", "There once was"]
HELPERS = [("Mom", "she"), ("Dad", "he"), ("Grandma", "she"), ("Grandpa", "he"), ("Aunt Rose", "she"),
           ("Uncle Joe", "he")]
BUILD = [("a fort", "blankets and chairs"), ("a boat", "sticks and leaves"), ("a tower", "blocks"),
         ("a house for the birds", "wood and nails"), ("a snowman", "snow and a carrot"),
         ("a robot", "boxes and tape"), ("a bridge", "stones and sticks"), ("a kite", "paper and string")]
QUESTIONS = [("Why is the sky blue?", "Because the sun lights it up."),
             ("Where do the birds sleep?", "They sleep in their nests."),
             ("Why does it rain?", "The clouds get full of water."),
             ("Where does the sun go at night?", "It goes to the other side of the world."),
             ("Why do cats purr?", "They purr when they are happy."),
             ("How do fish breathe?", "They breathe through their gills."),
             ("Why is the moon so bright?", "It shines with light from the sun."),
             ("Where do bees live?", "They live in a hive and make honey.")]
NUMBERS = "two three four five six seven".split()
MORALS = ["sharing makes everyone happy", "it is good to help your friends", "being kind is the best thing",
          "you should always say sorry", "friends make everything better", "it is okay to ask for help",
          "you should be careful near water", "trying again is how you learn", "telling the truth is brave",
          "good things come to those who wait"]


@dataclass
class Char:
    """One story character; `sub`/`obj`/`pos` keep the pronouns agreeing with the character all story."""

    name: str
    desc: str  # "the little fox": a second way to refer back
    intro: str  # "a little girl named Lily": only the first mention carries the description
    sub: str  # he / she
    obj: str  # him / her
    pos: str  # his / her

    @property
    def Sub(self) -> str:
        return self.sub.capitalize()


def make_char(rng: random.Random, used: set[str]) -> Char:
    """A child (named from GIRLS/BOYS) or an animal (named from PET_NAMES), never a name already used."""
    girl = rng.random() < 0.5
    if rng.random() < 0.65:
        pool, kind = (GIRLS, "girl") if girl else (BOYS, "boy")
        adj = rng.choice(KID_ADJ)
    else:
        pool, kind = PET_NAMES, rng.choice(ANIMALS)
        adj = rng.choice(ANIMAL_ADJ)
    name = rng.choice([n for n in pool if n not in used])
    used.add(name)
    art = "an" if adj[0] in "aeiou" else "a"
    intro = f"{art} {adj} {kind} {rng.choice(['named', 'called', 'named'])} {name}"
    return Char(name, f"the {adj} {kind}", intro, *(("she", "her", "her") if girl else ("he", "him", "his")))


SPEECH = {"say": ["said", "said", "shouted", "whispered", "cried"], "ask": ["asked", "asked", "wondered"],
          "reply": ["replied", "said", "answered"]}


def say(rng: random.Random, who: Char, line: str, how: str = "say") -> str:
    """A line of dialogue in one of several shapes (quote first, speaker first, ...); `how` picks the verbs."""
    verb = rng.choice(SPEECH[how])
    shape = rng.randrange(3)
    if shape == 1:
        return f'{who.name} {verb}, "{line}"'
    if line.endswith("."):  # a quote before its speaker ends in a comma: "Yes," said Tom.
        line = line[:-1] + ","
    return f'"{line}" {verb} {who.name}.' if shape == 0 else f'"{line}" {who.name} {verb}.'


def story(rng: random.Random) -> str:
    """One story: opening, two to five episodes drawn from a table, a closing that recalls the names."""
    used: set[str] = set()
    a, b = make_char(rng, used), make_char(rng, used)
    town = rng.choice(TOWN_A) + rng.choice(TOWN_B)
    color, adj, thing = rng.choice(COLORS), rng.choice(OBJ_ADJ), rng.choice(OBJECTS)
    it = f"the {color} {thing}"  # later mentions copy the colour from the first one
    s: list[str] = []
    s.append(f"{rng.choice(OPENINGS)} {a.intro}. {a.Sub} lived in {rng.choice(PLACES)} "
             f"in the town of {town}.")
    if rng.random() < 0.5:
        s.append(f"{a.name} had a friend, {b.intro}.")
        s.append(f"{a.name} and {b.name} liked to play together every day.")
        met = True
    else:
        met = False
    if rng.random() < 0.5:
        s.append(rng.choice(WEATHER))
    s.append(f"{rng.choice(TIMES)}, {a.name} found {'an' if adj[0] in 'aeiou' else 'a'} {adj} {color} {thing} "
             f"{rng.choice(['in the garden', 'on the path', 'under a tree', 'in a box', 'at the park', 'by the door'])}.")
    s.append(say(rng, a, rng.choice([f"What a {adj} {thing}!", f"I love this {thing}!",
                                     f"Look at my new {thing}!", f"I will keep this {thing} safe."])))

    def meet() -> None:
        nonlocal met
        if not met:
            s.append(f"Then {a.name} met {b.intro}.")
            s.append(say(rng, b, f"Hello, {a.name}! Can I play with {it}?", how="ask"))
            s.append(say(rng, a, rng.choice([f"Yes, {b.name}. Let's play together!", "No, it is mine!",
                                             f"Of course, {b.name}!"]), how="reply"))
            met = True

    def lose() -> None:
        spot = rng.choice(LOSE_SPOTS)
        s.append(f"But then {it} was gone! It was {spot}.")
        s.append(f"{a.name} felt {rng.choice(FEEL_BAD)}. {a.Sub} could not reach it.")
        meet()
        s.append(f"{b.name} wanted to help {a.obj}. {b.Sub} "
                 f"{rng.choice(['found a long stick', 'climbed up high', 'asked a big bird for help', 'used a rope', 'dug with a spoon'])} "
                 f"and got {it} back.")
        s.append(say(rng, a, f"Thank you, {b.name}! You are a good friend."))

    def trip() -> None:
        meet()
        place = rng.choice(GO_PLACES)
        s.append(f"{rng.choice(TIMES)}, {a.name} and {b.name} went to {place}. They {rng.choice(GAMES)} "
                 f"and {rng.choice(GAMES)}.")
        if rng.random() < 0.5:
            s.append(say(rng, b, f"I like {place}, {a.name}. Can we come back tomorrow?", how="ask"))
            s.append(say(rng, a, rng.choice(["Yes, we can!", "Maybe, if it does not rain.", "Only if Mom says yes."]),
                         how="reply"))

    def fight() -> None:
        meet()
        s.append(f"{b.name} took {it} and did not give it back. {a.name} was {rng.choice(['angry', 'upset', 'sad'])}.")
        s.append(say(rng, a, f"Give me my {thing}, {b.name}!"))
        s.append(f"{b.name} felt bad. {b.Sub} gave {it} back to {a.name} and said sorry.")
        s.append(f"{a.name} smiled. \"It is okay, {b.name}. We can share it,\" {a.sub} said.")

    def food() -> None:
        meet()
        n, f = rng.choice(NUMBERS), rng.choice(FOODS)
        helper, hsub = rng.choice(HELPERS)
        s.append(f"{helper} made {f} for {a.name} and {b.name}. {a.name} ate {n} bites and "
                 f"{b.name} ate {rng.choice(NUMBERS)}.")
        s.append(say(rng, b, f"This is so good! Thank you, {helper}."))
        s.append(f"{helper} smiled. {hsub.capitalize()} was {rng.choice(FEEL_GOOD)}.")

    def stranger() -> None:
        c = make_char(rng, used)
        s.append(f"At {rng.choice(GO_PLACES)}, {a.name} saw {c.intro}. {c.name} looked {rng.choice(FEEL_BAD)}.")
        s.append(say(rng, a, f"What is wrong, {c.name}?", how="ask"))
        s.append(say(rng, c, rng.choice([f"I lost my {rng.choice(OBJECTS)}.", "I cannot find my way home.",
                                         "I have no one to play with.", "I am hungry."]), how="reply"))
        s.append(f"{a.name} helped {c.name}. Soon {c.name} was {rng.choice(FEEL_GOOD)}, and {c.sub} "
                 f"thanked {a.name}.")

    def weather() -> None:
        s.append(f"{rng.choice(TIMES)}, {rng.choice(['a big storm came', 'it began to rain', 'the wind blew hard', 'it began to snow'])}.")
        s.append(f"{a.name} held {it} close and ran home to {town}. {a.Sub} was {rng.choice(FEEL_BAD)}, "
                 f"but {a.pos} {rng.choice(['mom', 'dad', 'grandma', 'dog'])} hugged {a.obj}.")

    def build() -> None:
        meet()
        what, stuff = rng.choice(BUILD)
        s.append(f"{a.name} and {b.name} wanted to build {what}. They used {stuff}.")
        if rng.random() < 0.5:
            s.append(f"It fell down {rng.choice(['once', 'two times', 'three times'])}, but they did not give up.")
        s.append(say(rng, b, f"We did it, {a.name}! Look at our {what[2:]}!"))
        s.append(f"{a.desc.capitalize()} and {b.desc} were very {rng.choice(FEEL_GOOD)}.")

    def question() -> None:
        helper, _ = rng.choice(HELPERS)
        q, ans = rng.choice(QUESTIONS)
        s.append(f"That evening, {a.name} sat with {helper}. {a.Sub} looked up and asked a question.")
        s.append(say(rng, a, q, how="ask"))
        s.append(f'{helper} smiled and said, "{ans}"')
        s.append(f"{a.name} thought about it for a long time.")

    def count() -> None:
        meet()
        n = rng.randint(3, 9)
        f = rng.choice(["apples", "cookies", "shells", "stickers", "marbles", "berries", "flowers"])
        k = rng.randint(1, n - 1)
        words = "zero one two three four five six seven eight nine".split()
        s.append(f"{a.name} had {words[n]} {f}. {a.Sub} gave {words[k]} to {b.name}.")
        s.append(f"Now {a.name} had {words[n - k]} {f} and {b.name} had {words[k]}.")
        s.append(say(rng, b, f"Thank you, {a.name}! Sharing is fun."))

    def surprise() -> None:
        meet()
        s.append(f"{b.name} wanted to make a surprise for {a.name}. {b.Sub} made "
                 f"{rng.choice(['a card', 'a cake', 'a crown of flowers', 'a picture', 'a little song'])} "
                 f"with {rng.choice(HELPERS)[0]}.")
        s.append(f"When {a.name} saw it, {a.sub} jumped up and down.")
        s.append(say(rng, a, rng.choice([f"This is the best day ever, {b.name}!", "I love it!",
                                         f"You are so kind, {b.name}."])))

    episodes = [lose, trip, fight, food, stranger, weather, build, question, count, surprise]
    for ep in rng.sample(episodes, rng.randint(2, 4)):
        ep()
    meet()  # the closing names both characters, whatever the episodes did
    close = rng.choice([
        f"From that day on, {a.name} and {b.name} were best friends.",
        f"When the sun went down, {a.name} and {b.name} walked back to {town}.",
        f"That night, {a.name} put {it} by {a.pos} bed and dreamed of {b.name}.",
        f"{a.name} and {b.name} played with {it} until it was time for bed.",
        f"Everyone in {town} was {rng.choice(FEEL_GOOD)}.",
        f"{a.desc.capitalize()} and {b.desc} went home to {town}, tired and {rng.choice(FEEL_GOOD)}.",
    ])
    s.append(close)
    if rng.random() < 0.6:
        s.append(f"{a.name} learned that {rng.choice(MORALS)}.")
    if rng.random() < 0.3:
        s.append("The end.")
    return " ".join(s)


def corpus(seed: int, n_bytes: int, exclude: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Stories from `seed` until they total `n_bytes` characters, skipping any story in `exclude`."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < n_bytes:
        d = story(rng)
        if d in exclude:
            continue
        docs.append(d)
        size += len(d) + 2  # + the blank line between documents
    return docs


# ---------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str]):
    """Byte-level BPE with VOCAB ids; `<s>` is prepended on encode by the post-processor (like Llama)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    assert [tok.token_to_id(t) for t in SPECIAL] == [0, 1, 2], "special tokens must take ids 0, 1, 2"
    return tok


def save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))


def encode_stream(tok, docs: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of `"\\n\\n".join(docs)` as one stream (what llmslim feeds a model for a text file), and
    the position where each document starts. The byte-level pre-tokenizer splits on whitespace, so encoding
    documents one by one and joining with the ids of "\\n\\n" gives the same ids as one big encode."""
    sep = tok.encode("\n\n", add_special_tokens=False).ids
    stream, starts = [], []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        if stream:
            stream.extend(sep)
        starts.append(len(stream))
        stream.extend(enc.ids)
    return stream, starts


# -------------------------------------------------------------------------------------------- model


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                       rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False)


def batches(stream, starts, batch: int, gen):
    """Endless [batch, SEQ_LEN] windows. Half start anywhere in the stream (how llmslim cuts text files:
    mid-story, no BOS); half start at a story with BOS in front (how a prompt looks), so both are learnt."""
    import torch

    n = stream.numel()
    starts_t = torch.tensor(starts)
    starts_t = starts_t[starts_t < n - SEQ_LEN]
    half = batch // 2
    while True:
        off = torch.randint(0, n - SEQ_LEN, (batch - half,), generator=gen)
        anywhere = torch.stack([stream[o: o + SEQ_LEN] for o in off.tolist()])
        doc = starts_t[torch.randint(0, starts_t.numel(), (half,), generator=gen)]
        bos = torch.ones(half, 1, dtype=torch.long)
        at_doc = torch.cat([bos, torch.stack([stream[o: o + SEQ_LEN - 1] for o in doc.tolist()])], dim=1)
        yield torch.cat([anywhere, at_doc])  # [batch, SEQ_LEN]


def train(model, stream, starts, *, steps: int, batch: int, lr: float, warmup: int, seed: int) -> tuple[float, float]:
    """AdamW, linear warmup then cosine to lr/10. Returns (final loss, mean of the last 50 steps' losses)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norm gains
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    it = batches(stream, starts, batch, gen)
    losses: list[float] = []
    t0 = tick = time.time()
    logged = 0  # steps done at the last progress line
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(it)
        loss = model(input_ids=x, labels=x).loss  # labels are shifted inside: predicts x[:, 1:]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step == 0 or step + 1 == steps:
            now = time.time()
            log(f"step {step + 1:5d}/{steps}  loss {losses[-1]:.4f}  lr {lr_at(step):.2e}  "
                f"{(step + 1 - logged) * x.numel() / (now - tick):7.0f} tok/s  elapsed {now - t0:6.0f} s")
            tick, logged = now, step + 1
    model.eval()
    return losses[-1], sum(losses[-50:]) / len(losses[-50:])


def eval_perplexity(model, ids) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping SEQ_LEN windows of the stream (trailing partial window dropped),
    each window's first token unscored: the scheme of llmslim.perplexity / llmslim.data."""
    import torch
    import torch.nn.functional as F

    n = len(ids) // SEQ_LEN
    w = torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 16):
            x = w[i: i + 16]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return math.exp(total / count), count


# ----------------------------------------------------------------------------------------- model card

CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---
# llmslim reference model

A {params_m:.2f} M-parameter Llama trained from scratch on synthetic children's stories, shipped with
llmslim so that the demo and the quality tests run offline. It is a test subject for compression, not a
useful language model: it only knows the grammar it was trained on.

## How it was made
Everything, text included, comes from one seeded script in the repository:

    {command}

- **Text**: a stochastic grammar in `scripts/make_reference_model.py` writes short stories (named
  children and animals, a named town, an object with a colour, dialogues, pronouns that agree); names and
  the town come back later in a story, so predicting them needs the context. Training text: {train_mb:.1f} MB,
  {train_docs} stories (seed 0), {train_tokens} tokens. Held-out text from other seeds, with any story that
  also occurs in the training text removed: `calib.txt` ({calib_kb} KB, seed 1) for calibration and
  `eval.txt` ({eval_kb} KB, seed 2, {eval_tokens} tokens) for perplexity. Stories are separated by a blank line.
- **Tokenizer**: byte-level BPE trained on the training text with the `tokenizers` library: {tok_vocab} ids
  (the grammar's text needs no more; the embedding has {vocab} rows, the unused ones never trained);
  `<unk>`=0, `<s>`=1 (prepended on encode, like Llama), `</s>`=2. The text has no `</s>`: a story ends
  with a blank line, so generation runs until `max_new_tokens`.
- **Model**: `LlamaForCausalLM`, {layers} layers, hidden {hidden}, {heads} query heads and {kv} KV heads of
  {head_dim} (grouped-query attention), SwiGLU FFN {ffn}, vocab {vocab}, context {ctx}, RoPE (theta
  10000), tied input/output embeddings. Stored in bfloat16 ({size_kb} KB of safetensors).
- **Training**: {steps} steps of {batch} x {seq} tokens ({tokens_m:.1f} M tokens), AdamW (betas 0.9/0.95,
  weight decay 0.1 on matrices), peak lr {lr:g}, {warmup} warmup steps then cosine to lr/10, gradient
  clipping 1.0, float32 on {threads} CPU threads (torch {torch}): {minutes:.1f} minutes. Half of each batch
  starts at a random offset of the token stream, half at a story start with `<s>` in front.

## Results
- Final training loss: {final_loss:.4f} (mean of the last 50 steps: {last50:.4f}).
- Held-out perplexity on `eval.txt`: **{ppl:.3f}** (float32 weights upcast from the stored bf16,
  {eval_windows} non-overlapping windows of {seq} tokens; each window's first token is not scored).
- Greedy continuation of "Once upon a time" (40 new tokens):

  > {sample}

## Licence
Apache-2.0, like llmslim. The training and held-out text is generated by the script; no third-party data.
"""


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 2400; 50 with --quick)")
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--quick", action="store_true", help="smoke test: small corpus, 50 steps, a temp folder")
    ap.add_argument("--batch", type=int, default=16, help="windows of 256 tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)  # the target machines have 2 cores; also keeps runs reproducible
    steps = args.steps or (50 if args.quick else 2400)
    out = args.out or (Path(tempfile.mkdtemp(prefix="llmslim-reference-")) if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    train_bytes, heldout_bytes = (400_000, 30_000) if args.quick else (8_000_000, 125_000)
    t_start = time.time()

    # 1. text: train from seed, held-out from seed+1 / seed+2, minus anything the training text contains
    train_docs = corpus(args.seed, train_bytes)
    seen = set(train_docs)
    calib_docs = corpus(args.seed + 1, heldout_bytes, exclude=seen)
    eval_docs = corpus(args.seed + 2, heldout_bytes, exclude=seen | set(calib_docs))
    for name, docs in (("calib.txt", calib_docs), ("eval.txt", eval_docs)):
        (out / name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    log(f"text: {len(train_docs)} training stories ({train_bytes / 1e6:.1f} MB), "
        f"{len(calib_docs)} calib, {len(eval_docs)} eval ({time.time() - t_start:.0f} s)")

    # 2. tokenizer
    tok = train_tokenizer(train_docs)
    save_tokenizer(tok, out)
    stream, starts = encode_stream(tok, train_docs)
    eval_text = (out / "eval.txt").read_text(encoding="utf-8")
    eval_ids = tok.encode(eval_text).ids  # one stream with <s> first, as llmslim.data.tokenize does
    log(f"tokenizer: {tok.get_vocab_size()} ids, {len(stream)} training tokens "
        f"({train_bytes / len(stream):.2f} chars/token), {len(eval_ids)} eval tokens")

    # 3. model
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config()).float()
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.3f} M parameters; training {steps} steps of {args.batch} x {SEQ_LEN} tokens")
    t0 = time.time()
    warmup = min(100, max(1, steps // 10))
    final_loss, last50 = train(model, torch.tensor(stream), starts, steps=steps, batch=args.batch, lr=args.lr,
                               warmup=warmup, seed=args.seed)
    minutes = (time.time() - t0) / 60

    # 4. save bf16, then measure what was saved (reloaded, upcast to float32)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False)
    model.to(torch.bfloat16).save_pretrained(str(out))
    model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ppl, _ = eval_perplexity(model, eval_ids)
    prompt = torch.tensor([tok.encode("Once upon a time").ids])
    with torch.no_grad():
        gen = model.generate(prompt, do_sample=False, max_new_tokens=40)
    sample = tok.decode(gen[0].tolist(), skip_special_tokens=True).replace("\n", " ")
    size_kb = (out / "model.safetensors").stat().st_size // 1024

    command = ".venv/bin/python scripts/make_reference_model.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    (out / "README.md").write_text(CARD.format(
        params_m=params / 1e6, command=command.strip(), train_mb=train_bytes / 1e6, train_docs=len(train_docs),
        train_tokens=len(stream), tok_vocab=tok.get_vocab_size(), calib_kb=(out / "calib.txt").stat().st_size // 1024,
        eval_kb=(out / "eval.txt").stat().st_size // 1024, eval_tokens=len(eval_ids), vocab=VOCAB,
        layers=6, hidden=128, heads=4, kv=2, head_dim=32, ffn=384, ctx=512, size_kb=size_kb, steps=steps,
        batch=args.batch, seq=SEQ_LEN, tokens_m=steps * args.batch * SEQ_LEN / 1e6, lr=args.lr, warmup=warmup,
        threads=torch.get_num_threads(), torch=torch.__version__.split("+")[0], minutes=minutes,
        final_loss=final_loss, last50=last50, ppl=ppl, eval_windows=len(eval_ids) // SEQ_LEN, sample=sample),
        encoding="utf-8")
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16]
    log(f"saved to {out} (model.safetensors {size_kb} KB, sha256 {digest}); training {minutes:.1f} min")
    log(f"final loss {final_loss:.4f} (last 50 steps {last50:.4f}); eval.txt perplexity {ppl:.3f} (float32)")
    log(f"sample: {sample}")


if __name__ == "__main__":
    main()
