"""How a study ranks its trials: on its validation part, or by k-fold cross-validation of its training part.

A 15% validation part of a small set is a few dozen crops (32 of a 216-crop set): one crop moves accuracy by
three points, so the best of many trials by it is mostly the luckiest. Below MIN_VALID_CROPS validation crops,
`--ranking auto` scores every trial by cross-validation instead: K models, each trained on K-1 folds of the
training part (its train and valid rows; the test rows stay out) and validated on the last, on the same seeded
folds for every trial (the finalists' folds when their counts agree), so that every crop of the training part
validates once and trials are compared on the same crops. The trial's value is the mean over its folds of the
best validation `monitor`; it costs K models on (K-1)/K of the training part instead of one on the train split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import optuna

from smids_ml import SmidsError
from smids_ml.config import MIN_VALID_CROPS
from smids_ml.data import Dataset, assign_folds
from smids_ml.finalists import part_ratio, training_part

RANKING_ATTR = "smids_ml.ranking"  # study attr: `split` or `K-fold`, so a resumed study keeps ranking the same way


@dataclass(frozen=True)
class Ranking:
    folds: int  # 0: the study's validation part
    reason: str

    @property
    def name(self) -> str:
        return f"{self.folds}-fold" if self.folds else "split"

    def line(self) -> str:
        how = (f"by {self.folds}-fold cross-validation of the training part" if self.folds
               else "on the validation part")
        return f"ranking trials {how}: {self.reason}"

    def train_images(self, dataset: Dataset) -> int:
        """The crops one of a trial's models trains on (what the epochs decided from the data follow)."""
        if not self.folds:
            return len(dataset.part("train"))
        return round(len(training_part(dataset).manifest) * (self.folds - 1) / self.folds)

    def refit_ratio(self, dataset: Dataset) -> float:
        """A model on the whole training part over what one trial's run took (the finalists' cost, from the trials'):
        with folds a run is K models on (K-1)/K of the part, so one model on the part is the run / (K-1)."""
        return 1 / (self.folds - 1) if self.folds else part_ratio(dataset)


SPLIT = Ranking(0, "--ranking split")


def choose_ranking(mode: str, valid: int, folds: int) -> Ranking:
    """The ranking `mode` (auto, split, folds) gives a study whose validation part holds `valid` crops."""
    if mode == "split" or (mode == "auto" and valid >= MIN_VALID_CROPS):
        why = "--ranking split" if mode == "split" else f"≥ {MIN_VALID_CROPS}"
        return Ranking(0, f"it holds {valid} crops ({why})")
    why = "--ranking folds" if mode == "folds" else f"< {MIN_VALID_CROPS}"
    return Ranking(folds, f"the validation part would hold {valid} crops ({why})")


def fold_parts(dataset: Dataset, folds: int, seed: int) -> list[Dataset]:
    """The training part K times, fold k as `valid` and the others as `train` (no test rows): stratified by class,
    duplicates in one fold, seeded as `cv` seeds them. SmidsError when a class has fewer crops than folds."""
    part = training_part(dataset)
    try:
        fold = assign_folds(part.manifest, folds, seed)
    except SmidsError as exc:
        raise SmidsError(f"--ranking-folds {folds}: the training part's {exc}; give fewer folds or --ranking split") \
            from None
    return [part.with_manifest(part.manifest.assign(split=np.where(fold == k, "valid", "train")))
            for k in range(folds)]


def keep_ranking(study: optuna.Study, ranking: Ranking) -> None:
    """A study ranks all its trials one way: a new one records this ranking; one whose trials were ranked otherwise
    (a study from before rankings existed ranked on the split) is refused, since their values would not compare."""
    recorded = study.user_attrs.get(RANKING_ATTR) or ("split" if study.get_trials(deepcopy=False) else None)
    if recorded is None:
        study.set_user_attr(RANKING_ATTR, ranking.name)
    elif recorded != ranking.name:
        how, flags = (("on the validation part", "--ranking split") if recorded == "split" else
                      (f"by {recorded} cross-validation", f"--ranking folds --ranking-folds {recorded.split('-')[0]}"))
        raise SmidsError(f"study {study.study_name} ranked its trials {how}, not {ranking.name}: run it with {flags}, "
                         "or use a new --study-name")
