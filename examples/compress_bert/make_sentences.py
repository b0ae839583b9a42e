"""Generate torchslim's bundled sentence set: src/torchslim/data/sentences.jsonl (deterministic).

Every sentence is composed here from hand-written phrase pairs: a subject, an action and a
time/place modifier, each with two wordings that mean the same thing. A paraphrase pair takes
one (subject, action, modifier) triple and words it twice, differently (synonyms and word order),
so retrieving the partner of a sentence among all the others requires its meaning, not its words.
The ``eval`` split holds the paraphrase pairs; the ``train`` split holds single sentences built
from triples never used in ``eval`` (calibration and distillation take their text from there).

Run: python examples/compress_bert/make_sentences.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    ("the doctor", "the physician"), ("my neighbour", "the person who lives next door to me"),
    ("the young teacher", "the new schoolteacher"), ("a group of students", "several pupils"),
    ("the old fisherman", "the elderly angler"), ("our manager", "the boss of our team"),
    ("the little girl", "the small child"), ("a tourist from Spain", "a Spanish visitor"),
    ("the police officer", "the cop"), ("my grandmother", "my mother's mother"),
    ("the chef", "the head cook"), ("two engineers", "a pair of engineers"),
    ("the mayor", "the head of the city council"), ("a famous singer", "a well-known vocalist"),
    ("the farmer", "the man who works the farm"), ("my brother", "my male sibling"),
    ("the pilot", "the aviator"), ("a nurse", "a hospital caregiver"),
    ("the librarian", "the woman who runs the library"), ("the lawyer", "the attorney"),
    ("the baker", "the man from the bakery"), ("our cat", "the family cat"),
    ("the scientist", "the researcher"), ("a taxi driver", "a cab driver"),
    ("the author", "the writer"), ("the children", "the kids"),
    ("the mechanic", "the car repairman"), ("my best friend", "my closest friend"),
    ("the president", "the head of state"), ("a stranger", "someone I did not know"),
    ("the gardener", "the man who tends the garden"), ("the shop owner", "the owner of the store"),
    ("the coach", "the team's trainer"), ("our teenage son", "our adolescent boy"),
    ("the professor", "the university lecturer"), ("a journalist", "a news reporter"),
    ("the dog", "the puppy"), ("the waiter", "the server at the restaurant"),
    ("the firefighters", "the fire crew"), ("my aunt", "my father's sister"),
]

ACTIONS = [
    ("repaired the old bicycle", "fixed the aging bike"), ("bought a new car", "purchased a brand-new automobile"),
    ("lost the house keys", "misplaced the keys to the house"), ("painted the kitchen walls", "gave the kitchen walls a new coat of paint"),
    ("cooked dinner for everyone", "made the evening meal for the whole group"), ("wrote a long letter", "composed a lengthy letter"),
    ("cancelled the meeting", "called off the meeting"), ("planted tomatoes", "put tomato plants in the ground"),
    ("forgot the umbrella", "left the umbrella behind"), ("won the chess tournament", "came first in the chess competition"),
    ("broke a window", "smashed a pane of glass"), ("called the bank", "phoned the bank"),
    ("read the newspaper", "looked through the daily paper"), ("cleaned the garage", "tidied up the garage"),
    ("sold the old piano", "got rid of the old piano for money"), ("caught a large fish", "landed a big fish"),
    ("missed the train", "did not make it onto the train in time"), ("adopted a kitten", "took in a young cat"),
    ("climbed the mountain", "hiked to the top of the mountain"), ("baked a chocolate cake", "made a cake with chocolate in the oven"),
    ("found a wallet on the street", "picked up a wallet someone dropped outside"), ("started a new job", "began working at a new company"),
    ("learned to swim", "found out how to swim"), ("moved to another city", "relocated to a different town"),
    ("fell asleep on the sofa", "dozed off on the couch"), ("washed the dishes", "did the washing-up"),
    ("answered all the emails", "replied to every message in the inbox"), ("ran a marathon", "completed a 42-kilometre race"),
    ("sang at the wedding", "performed a song at the marriage ceremony"), ("fixed the leaking tap", "stopped the faucet from dripping"),
    ("booked a flight to Rome", "reserved a plane ticket to Rome"), ("visited the museum", "went to see the museum"),
    ("returned the library books", "brought the borrowed books back to the library"), ("argued with the neighbours", "had a quarrel with the people next door"),
    ("fed the ducks", "gave bread to the ducks"), ("signed the contract", "put a signature on the agreement"),
    ("watched a horror film", "saw a scary movie"), ("hurt a knee", "injured a knee"),
    ("ordered a pizza", "had a pizza delivered"), ("built a wooden shed", "constructed a small timber hut"),
    ("opened a bakery", "launched a shop that sells bread"), ("quit smoking", "gave up cigarettes"),
    ("crashed the car", "had a car accident"), ("studied for the exam", "prepared for the test"),
    ("paid the electricity bill", "settled the power bill"), ("borrowed money from a friend", "got a loan from a friend"),
    ("got a promotion", "was moved up to a higher position"), ("took a nap", "had a short sleep"),
    ("climbed a tall tree", "went up a high tree"), ("lost the match", "was defeated in the game"),
    ("planned a surprise party", "organised a party as a surprise"), ("knitted a scarf", "made a scarf out of wool"),
    ("cut the grass", "mowed the lawn"), ("broke the old record", "beat the previous record"),
    ("spilled coffee on the laptop", "knocked coffee over onto the computer"), ("gave a speech", "delivered a talk"),
    ("bought fresh vegetables", "purchased some fresh produce"), ("fixed the roof", "repaired the roof"),
    ("rescued a stray dog", "saved a homeless dog"), ("played the violin", "performed on the violin"),
]

MODIFIERS = [
    ("yesterday morning", "the previous morning"), ("last weekend", "over the past weekend"),
    ("at the airport", "in the airport terminal"), ("during the storm", "while the storm was raging"),
    ("before breakfast", "prior to eating breakfast"), ("in the park", "at the public park"),
    ("late at night", "in the middle of the night"), ("on Monday", "at the start of the week"),
    ("after work", "once work was over"), ("in the city centre", "downtown"),
    ("last summer", "during the summer of last year"), ("at the beach", "by the seaside"),
    ("two days ago", "the day before yesterday"), ("in the village", "in the small town"),
    ("at lunchtime", "around noon"), ("on the way home", "while heading home"),
    ("this afternoon", "earlier this afternoon"), ("in the rain", "while it was raining"),
    ("at the station", "at the railway station"), ("during the holidays", "over the vacation"),
    ("in the early evening", "around dusk"), ("at the hospital", "in the clinic"),
    ("last year", "twelve months ago"), ("at the market", "at the marketplace"),
    ("on Christmas Eve", "the night before Christmas"), ("at school", "in the classroom"),
    ("in the garden", "in the backyard"), ("after the concert", "once the concert had ended"),
    ("on a cold winter day", "on a freezing day in winter"), ("at the office", "at the workplace"),
]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def wordings(subject: tuple[str, str], action: tuple[str, str], modifier: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    """Two different wordings of one event: the first wording plain, the second reordered with synonyms."""
    a = f"{_cap(subject[0])} {action[0]} {modifier[0]}."
    if rng.random() < 0.5:
        b = f"{_cap(modifier[1])}, {subject[1]} {action[1]}."
    else:
        b = f"{_cap(subject[1])} {action[1]} {modifier[1]}."
    return a, b


def main(n_eval: int = 400, n_train: int = 2400, seed: int = 13) -> None:
    rng = random.Random(seed)
    triples = [(s, a, m) for s in range(len(SUBJECTS)) for a in range(len(ACTIONS)) for m in range(len(MODIFIERS))]
    rng.shuffle(triples)
    # eval triples share no (subject, action) combination so every pair is its own event
    eval_t, used = [], set()
    for s, a, m in triples:
        if len(eval_t) >= n_eval:
            break
        if (s, a) in used:
            continue
        used.add((s, a))
        eval_t.append((s, a, m))
    eval_set = set(eval_t)
    train_t = [t for t in triples if t not in eval_set and (t[0], t[1]) not in used][:n_train]
    rows = []
    for s, a, m in eval_t:
        x, y = wordings(SUBJECTS[s], ACTIONS[a], MODIFIERS[m], rng)
        rows.append({"split": "eval", "a": x, "b": y})
    seen = {r["a"] for r in rows} | {r["b"] for r in rows}
    for s, a, m in train_t:
        x, y = wordings(SUBJECTS[s], ACTIONS[a], MODIFIERS[m], rng)
        text = x if rng.random() < 0.5 else y
        if text not in seen:
            seen.add(text)
            rows.append({"split": "train", "text": text})
    out = Path(__file__).resolve().parents[2] / "src" / "torchslim" / "data" / "sentences.jsonl"
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {out}: {sum(r['split'] == 'eval' for r in rows)} paraphrase pairs, "
          f"{sum(r['split'] == 'train' for r in rows)} train sentences")


if __name__ == "__main__":
    main()
