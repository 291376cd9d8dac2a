"""Offline generators of MCMC component datasets, for machines without the Hugging Face hub.

Each generator returns rows ``{"question", "correct", "incorrect"}`` in the format of its hub dataset
(caft_method.md section 5.2) and is a pure function of its arguments: the same seed gives the same rows in the
same order, with no network and no files read. Questions are unique within a generator's output (the MCMC builder
drops repeated questions, so repeats would only shrink the task).

There is no offline ``sports`` generator. ``hc-mats/sports-gemma-2-2b-top-1000`` is the 1,000 athletes whose sport
Gemma-2-2B knows best, so its questions test a model's knowledge of real people; invented names would be
unanswerable and a hand-made list of real athletes would not be filtered by the model. Pass a local copy
(``sports.csv``) instead.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

__all__ = ["GENERATORS", "MAIN_VERBS", "pronouns", "sentiment", "subject_verb_agreement"]

# ---------------------------------------------------------------------------------------------------- verbs

SVA_PREFIX = "Choose the correct verb form for the following sentence: "
# (singular, plural); the noun inventory of the hub dataset (caft_method.md 5.2)
_SUBJECTS = [(w, w + "s") for w in "athlete aunt boy carpenter doctor farmer father friend girl guy kid".split()]
_SUBJECTS += [("lawyer", "lawyers"), ("man", "men"), ("mother", "mothers"), ("poet", "poets"), ("singer", "singers")]
_SUBJECTS += [("teacher", "teachers"), ("uncle", "uncles"), ("victim", "victims"), ("woman", "women")]
_OBJECTS = [
    (w, w + "s")
    for w in (
        "architect assistant bike car cat chair chef dancer desk dog driver executive guard minister parent skater "
        "table tree truck window"
    ).split()
]
# Relative clauses need an object that can do the liking ("the woman that the dogs like"), so only these nouns.
_ANIMATE = {"architect", "assistant", "cat", "chef", "dancer", "dog", "driver", "executive", "guard", "minister"}
_ANIMATE |= {"parent", "skater"}
_PREPOSITIONS = ("near", "behind", "beside")
# (agrees with a singular subject, agrees with a plural one)
_RC_VERBS = [(v + "s", v) for v in ("like", "admire", "know", "hate", "love", "trust", "help", "follow", "avoid")]
#: (singular, plural) main-verb forms of the hub dataset; an answer among them reveals the subject's number
MAIN_VERBS = (("is", "are"), ("has", "have"), ("does", "do"), ("goes", "go"))


def subject_verb_agreement(seed: int = 0, n: int = 4000) -> list[dict]:
    """``n`` subject-verb agreement questions: which verb form agrees with the head subject?

    Half "The {subject} {near/behind/beside} the {object}", half "The {subject} that the {object} {verb}" (the
    relative-clause verb agrees with its own subject, the object noun). Both frames put a noun between the head
    subject and the verb to be chosen, often of the other number, which is what makes the task non-trivial. The
    answer pairs is/are, has/have, does/do, goes/go are assigned in turn, so the 8 correct forms are about equally
    frequent. 4,800 prepositional and 8,640 relative-clause prefixes exist; ``n`` must not exceed 9,600.
    """
    rng = random.Random(seed)
    pp, rc = [], []
    for (subj_sg, subj_pl), (obj_sg, obj_pl) in itertools.product(_SUBJECTS, _OBJECTS):
        for subject, plural in ((subj_sg, False), (subj_pl, True)):
            pp += [(f"The {subject} {p} the {obj}", plural) for p in _PREPOSITIONS for obj in (obj_sg, obj_pl)]
            if obj_sg in _ANIMATE:
                for verb_sg, verb_pl in _RC_VERBS:
                    rc += [(f"The {subject} that the {obj_sg} {verb_sg}", plural)]
                    rc += [(f"The {subject} that the {obj_pl} {verb_pl}", plural)]
    n_pp = n // 2
    if not 0 < n <= 2 * len(pp):
        raise ValueError(f"n must be between 1 and {2 * len(pp)} for subject_verb_agreement, got {n}.")
    chosen = rng.sample(pp, n_pp) + rng.sample(rc, n - n_pp)
    rng.shuffle(chosen)
    rows = []
    for i, (prefix, plural) in enumerate(chosen):
        forms = MAIN_VERBS[i % len(MAIN_VERBS)]
        rows.append({"question": SVA_PREFIX + prefix, "correct": forms[plural], "incorrect": forms[not plural]})
    return rows


# ---------------------------------------------------------------------------------------------------- sentiment

SENTIMENT_PREFIX = "What is the sentiment of the following sentence? "
# Polarity comes from the adjectives alone: adverbs are neutral intensifiers and there are no negations, so every
# sentence has one unambiguous label. No word starts with "u" or a silent "h", which keeps the a/an rule simple.
_POSITIVE = (
    "brilliant charming delightful gripping moving witty beautiful clever engaging fresh funny gorgeous heartfelt "
    "inventive joyful lovely memorable powerful smart stunning superb thoughtful touching wonderful masterful "
    "elegant exciting enjoyable rewarding tender"
).split()
_NEGATIVE = (
    "awful boring bland clumsy dreary dull flat forgettable hollow lame lifeless messy pointless sloppy stale "
    "tedious terrible tiresome weak dreadful painful shallow silly tired predictable pretentious confused "
    "disappointing annoying sluggish"
).split()
_ADVERBS = (
    "truly really remarkably thoroughly genuinely deeply incredibly absolutely consistently strikingly surprisingly "
    "wholly"
).split()
_NOUNS = (
    "film movie story script comedy drama thriller documentary romance sequel performance soundtrack ending cast "
    "screenplay adaptation"
).split()
# {art} is the article for the word after it; {adj2}/{noun2} differ from {adj}/{noun} and share the polarity.
_SENTIMENT_FRAMES = (
    "{Art} {adv} {adj} {noun}.",
    "The {noun} is {adv} {adj}.",
    "{Adv} {adj}.",
    "What {art} {adj} {noun}!",
    "I found the {noun} {adv} {adj}.",
    "{Adj} from start to finish.",
    "The {noun} feels {adv} {adj}, and the {noun2} is {adj2}.",
    "{Art} {adj}, {adj2} {noun}.",
    "It is {art} {adv} {adj} {noun} from beginning to end.",
    "Both the {noun} and the {noun2} are {adv} {adj}.",
    "{Adj} and {adj2}.",
    "The whole {noun} is {adj} and {adj2}.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeio" else "a"


def _sentence(frame: str, adjectives: list[str], rng: random.Random) -> str:
    adj, adj2 = rng.sample(adjectives, 2)
    noun, noun2 = rng.sample(_NOUNS, 2)
    adv = rng.choice(_ADVERBS)
    # The article goes before whatever word follows it in this frame: the adverb if there is one, else the adjective.
    art = _article(adv if "{art} {adv}" in frame.lower() else adj)
    words = {"adj": adj, "adj2": adj2, "noun": noun, "noun2": noun2, "adv": adv, "art": art}
    words |= {k.capitalize(): v.capitalize() for k, v in words.items()}
    return frame.format(**words)


def sentiment(seed: int = 0, n: int = 1167) -> list[dict]:
    """``n`` short movie-review sentences labelled positive / negative (``n // 2`` positive), in shuffled order.

    Sentences come from 12 hand-written frames filled with word lists ("A truly charming film.", "Remarkably
    dull."); duplicates are redrawn, and ``n`` above what the frames can produce raises ValueError. The default n is
    the size of ``kh4dien/mc-sentiment``, so offline MCMC splits have the paper's sizes (816/175/176).
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 for sentiment (one of each label), got {n}.")
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    for label, other, adjectives, count in (
        ("positive", "negative", _POSITIVE, n // 2),
        ("negative", "positive", _NEGATIVE, n - n // 2),
    ):
        made, tries = 0, 0
        while made < count:
            tries += 1
            if tries > 100 * count:
                raise ValueError(f"cannot make {count} distinct {label} sentences; ask for a smaller n than {n}.")
            question = SENTIMENT_PREFIX + _sentence(rng.choice(_SENTIMENT_FRAMES), adjectives, rng)
            if question not in seen:
                seen.add(question)
                rows.append({"question": question, "correct": label, "incorrect": other})
                made += 1
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------------- pronouns

# Occupations in the spirit of Winogender; the other participant is someone any of them could deal with.
_OCCUPATIONS = (
    "accountant architect baker carpenter cashier chef chemist counselor dentist designer dietitian electrician "
    "engineer firefighter hairdresser inspector instructor janitor librarian lawyer mechanic nurse nutritionist "
    "painter paramedic pharmacist physician pilot plumber programmer receptionist salesperson scientist secretary "
    "surgeon tailor teacher technician therapist veterinarian auditor editor supervisor manager clerk bartender "
    "hygienist pathologist appraiser investigator"
).split()
_PARTICIPANTS = ("client", "customer", "visitor", "neighbor", "colleague")
# "_" is always a subject, and the word after it is a modal or a past-tense verb, which agree with he, she and
# they alike ("they was" would make "they" wrong for a reason other than case).
_PRONOUN_FRAMES = (
    "The {occ} promised the {other} that _ would finish the work by Friday.",
    "The {occ} told the {other} that _ could start first thing tomorrow.",
    "The {occ} assured the {other} that _ had checked every detail twice.",
    "The {occ} warned the {other} that _ might need more time.",
    "The {occ} called the {other} because _ wanted to confirm the appointment.",
    "The {occ} emailed the {other} to say that _ would be late.",
    "The {occ} reminded the {other} that _ should bring the signed forms.",
    "The {occ} explained to the {other} that _ had already reviewed the file.",
    "The {other} asked the {occ} whether _ could stay a little longer.",
    "The {other} thanked the {occ} because _ had solved the problem so quickly.",
    "The {occ} apologized to the {other} because _ forgot to send the invoice.",
    "The {occ} reassured the {other} that _ would handle everything.",
    "The {other} waited for the {occ} until _ finished the meeting.",
    "The {occ} met the {other} after _ returned from lunch.",
    "The {occ} informed the {other} that _ needed a second opinion.",
    "The {other} told the {occ} that _ should take a day off.",
    "The {occ} smiled at the {other} because _ understood the plan at last.",
    "The {occ} left a note for the {other} saying that _ will return on Monday.",
    "The {occ} promised the {other} that _ would keep the details private.",
    "Before the {other} arrived, the {occ} made sure that _ had prepared the room.",
    "The {occ} admitted to the {other} that _ made a mistake on the report.",
    "The {other} hoped that the {occ} could explain what _ had found.",
    "The {occ} offered the {other} a discount because _ had waited so long.",
    "The {occ} told the {other} that _ can answer questions after the session.",
    "The {occ} wrote to the {other} that _ would review the proposal carefully.",
    "The {occ} and the {other} agreed that _ should lead the next meeting.",
    "The {occ} insisted to the {other} that _ knew the right procedure.",
    "The {occ} mentioned to the {other} that _ worked abroad for years.",
    "The {occ} let the {other} know that _ would arrive early.",
    "The {occ} convinced the {other} that _ could fix the issue without extra cost.",
    "The {occ} reported to the {other} that _ found nothing unusual.",
    "The {other} trusted the {occ} because _ explained things clearly.",
)
_NOMINATIVE = ("he", "she", "they")
_OBJECTIVE = ("him", "her", "them")


def pronouns(seed: int = 0, n: int = 2000) -> list[dict]:
    """``n`` occupation sentences with a subject-position blank: correct a nominative pronoun, incorrect an object one.

    As in ``kh4dien/mc-gender``, any nominative pronoun fits the blank, so the label (he / she / they, assigned in
    turn) is about grammatical case, not about who the blank refers to; the incorrect answer is a random object
    pronoun. 32 frames x 50 occupations x 5 participants = 8,000 distinct questions are available.
    """
    questions = [
        frame.format(occ=occ, other=other)
        for frame in _PRONOUN_FRAMES
        for occ in _OCCUPATIONS
        for other in _PARTICIPANTS
    ]
    if not 0 < n <= len(questions):
        raise ValueError(f"n must be between 1 and {len(questions)} for pronouns, got {n}.")
    rng = random.Random(seed)
    chosen = rng.sample(questions, n)
    return [
        {"question": q, "correct": _NOMINATIVE[i % 3], "incorrect": rng.choice(_OBJECTIVE)}
        for i, q in enumerate(chosen)
    ]


GENERATORS: dict[str, Callable[..., list[dict]]] = {
    "verbs": subject_verb_agreement,
    "sentiment": sentiment,
    "pronouns": pronouns,
}
