"""WUPS: COCO-QA's standard soft accuracy (Malinowski & Fritz 2014, as reported by Ren et al. 2015).

For one question with predicted answer ``a`` and ground truth ``t`` (COCO-QA answers are single words):

    WUP(a, t) = 1 if a == t; else max over the noun synsets x of a and y of t of Wu-Palmer(x, y)
                (0 when either word has no noun synset in WordNet)
    WUPS@th(a, t) = WUP(a, t) if WUP(a, t) >= th else 0.1 * WUP(a, t)

and WUPS@th of a split is the mean over its questions (answers that list several words separated by commas are
scored with Malinowski's min of the two products of best matches; COCO-QA has none). WUPS@0.0 never down-weights.
This is the computation of Malinowski's ``calculate_wups.py`` on nltk's WordNet reader (``wordnet.synsets(word,
pos=NOUN)``, which also finds inflected forms: "dogs" -> dog.n.01).

The WordNet 3.0 data is looked for, with no network access, in ``paths.wordnet`` (a folder of WordNet's
``data.noun``/``index.noun``/... files, or nltk's ``corpora/wordnet``), then nltk's data folders
(``python -m nltk.downloader wordnet``), then Debian's ``wordnet-base`` package (``/usr/share/wordnet``, read in
place). Without any of them the WUPS keys are left out and one warning says how to install the data.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from clipqa import metrics as M
from clipqa.errors import ClipqaError

log = logging.getLogger(__name__)

DEBIAN_WORDNET = Path("/usr/share/wordnet")  # Debian/Ubuntu: apt-get install wordnet-base
INSTALL_HINT = (
    "install WordNet 3.0 with `apt-get install wordnet-base` (Debian/Ubuntu; .ci/run does this) or "
    "`python -m nltk.downloader wordnet` (once, with network), or point paths.wordnet at a WordNet 3.0 folder"
)
# WordNet 3.0's lexicographer files (lexnames(5WN)): number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_warned = False


class Wups:
    """WUP similarity and WUPS scores over a WordNet reader, with per-word and per-pair caches."""

    def __init__(self, wordnet):
        self.wordnet = wordnet
        self._synsets: dict[str, tuple] = {}
        self._sim: dict[tuple[str, str], float] = {}

    def synsets(self, word: str) -> tuple:
        """The noun synsets of ``word`` (or of its base form: nltk's morphy), () when WordNet has none."""
        if word not in self._synsets:
            self._synsets[word] = tuple(self.wordnet.synsets(word, pos="n")) if word else ()
        return self._synsets[word]

    def similarity(self, a: str, t: str) -> float:
        """WUP(a, t): 1.0 for identical words, else the best Wu-Palmer similarity over their noun synsets."""
        if a == t:
            return 1.0
        key = (a, t) if a <= t else (t, a)
        if key not in self._sim:
            pairs = ((x, y) for x in self.synsets(a) for y in self.synsets(t))
            self._sim[key] = max((x.wup_similarity(y) or 0.0 for x, y in pairs), default=0.0)
        return self._sim[key]

    def word_score(self, a: str, t: str, threshold: float) -> float:
        s = self.similarity(a, t)
        return s if s >= threshold else 0.1 * s

    def score(self, answer: str, truth: str, threshold: float) -> float:
        """WUPS@threshold of one prediction; comma-separated answer lists as in Malinowski & Fritz."""
        A = [w.strip() for w in answer.split(",") if w.strip()]
        T = [w.strip() for w in truth.split(",") if w.strip()]
        if not A and not T:
            return 1.0
        if not A or not T:
            return 0.0
        left = right = 1.0
        for a in A:
            left *= max(self.word_score(a, t, threshold) for t in T)
        for t in T:
            right *= max(self.word_score(a, t, threshold) for a in A)
        return min(left, right)

    def by_type(self, predictions: Sequence[str], truths: Sequence[str], types: Sequence[int], split: str = "test"):
        """``{test/wups_0.9: ..., test/wups_0.9/object: ..., test/wups_0.0: ..., ...}`` over the questions given."""
        out: dict[str, float] = {}
        for th in M.WUPS_THRESHOLDS:
            scores = [self.score(p, t, th) for p, t in zip(predictions, truths, strict=True)]
            out.update(M.mean_by_type(scores, types, M.wups_key(th, split)))
        return out


def find_wordnet(folder: str | None) -> Wups | None:
    """A :class:`Wups` over WordNet 3.0 from ``folder`` (``paths.wordnet``), nltk's data folders or Debian's
    package; None, with one warning per process, when there is none."""
    global _warned
    wups = _load(str(Path(folder).expanduser()) if folder else None)
    if wups is None and not _warned:
        _warned = True
        log.warning("WUPS@0.9 / WUPS@0.0 not computed: no WordNet 3.0 data found <paths.wordnet>; %s.", INSTALL_HINT)
    return wups


@cache
def _load(folder: str | None) -> Wups | None:
    if folder is not None:
        if not (Path(folder) / "data.noun").is_file():
            raise ClipqaError(
                f"paths.wordnet={folder} holds no WordNet data (no data.noun there). Point it at a WordNet 3.0 "
                f"folder (e.g. /usr/share/wordnet from Debian's wordnet-base), or set paths.wordnet=null to look in "
                f"the usual places."
            )
        return _plain_folder(Path(folder))
    try:  # nltk's own data folders (python -m nltk.downloader wordnet); LazyCorpusLoader never downloads
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        log.info("WordNet %s from nltk's data folder (for WUPS)", wordnet.get_version())
        return Wups(wordnet)
    except LookupError:
        pass
    if (DEBIAN_WORDNET / "data.noun").is_file():
        return _plain_folder(DEBIAN_WORDNET)
    return None


def _plain_folder(root: Path) -> Wups:
    """nltk's WordNet reader on a plain WordNet folder (Debian's ``/usr/share/wordnet``), read in place.

    Two things nltk's reader expects of its own data folder are supplied here: the ``lexnames`` file (WordNet's
    lexnames(5WN), not in Debian's package) and no mapping to another WordNet version (nltk >= 3.9 maps every
    reader onto its ``corpora/wordnet`` through ``index.sense``, for the Open Multilingual WordNet; WUPS needs
    neither).
    """
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    lexnames = "".join(f"{i:02d}\t{n}\t{_CATEGORY[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES))

    class PlainWordNet(WordNetCorpusReader):
        def open(self, fileid):
            if fileid == "lexnames" and not (root / "lexnames").is_file():
                return io.StringIO(lexnames)
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None

    if str(root) not in nltk.data.path:  # nltk >= 3.10 opens corpus files only under its data paths
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():  # "multilingual functions are not available": WUPS uses none
        warnings.simplefilter("ignore", UserWarning)
        wordnet = PlainWordNet(str(root), None)
    log.info("WordNet %s from %s (for WUPS)", wordnet.get_version(), root)
    return Wups(wordnet)


def split_wups(
    wordnet: str | None, split, predictions: dict[int, int], classes: list[str], name: str = "test"
) -> dict[str, float]:
    """WUPS@0.9 and WUPS@0.0 (overall and per type, keys ``<name>/wups_0.9`` ...) of a split's predictions
    (question number -> class id); empty without WordNet data. ``wordnet``: ``paths.wordnet`` (None: the usual
    places)."""
    wups = find_wordnet(wordnet)
    if wups is None:
        return {}
    rows = sorted(predictions.items())
    return wups.by_type(
        [classes[p] for _, p in rows], [split.answers[i] for i, _ in rows], [split.types[i] for i, _ in rows], name
    )
