"""`train_verifier` end to end: sample (cached), featurize (cached), search, refit, test, save.

Problem sets: training problems are ``task.problems(n, TRAIN_SEED_BASE)`` and test problems
``task.problems(m, TEST_SEED)``; both seeds are far from the small seeds evaluations use, and
distinct seeds give disjoint problem sets. Search and refit see training problems only; the
test problems are scored once, by the chosen probe.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ttscale.verifier.answer_fit import (
    AnswerTrial,
    fit_and_test_answers,
    rank_trial,
    search_answer_probe,
)
from ttscale.verifier.answers import RESTATE_TEMPLATE, AnswerTable, answer_table
from ttscale.verifier.data import (
    DATA_DIR,
    TEST_SEED,
    TRAIN_SEED_BASE,
    build_dataset,
    check_split,
)
from ttscale.verifier.features import POOLINGS, extract_features
from ttscale.verifier.fit import FeatureTable, fit_and_test, search
from ttscale.verifier.likelihood import (
    LIKELIHOOD_FEATURES,
    LIKELIHOOD_TEMPLATES,
    likelihood_table,
)
from ttscale.verifier.probe import CARD_VERSION, INPUTS, FeatureSpec, Probe, model_hash
from ttscale.verifier.train import TrainConfig

if TYPE_CHECKING:
    from ttscale.llm import LLM
    from ttscale.tasks import Task

MIN_TRAIN_PROBLEMS = 20  # below this a 4-fold search has < 5 problems per fold
MIN_TEST_PROBLEMS = 10


@dataclass(frozen=True)
class VerifierRun:
    """Settings of one `train-verifier` run (everything the card's command spells out)."""

    task: str
    n_problems: int
    samples: int
    temperature: float
    out: Path
    test_problems: int = 200
    top_p: float = 0.95
    max_tokens: int = 160
    layers: tuple[int, ...] = ()
    folds: int = 4
    epochs: int = 300
    seed: int = 0
    data_dir: Path = DATA_DIR
    # "text": the head reads each candidate's own tokens; "answer": each distinct answer,
    # restated (verifier.answers); "likelihood": each distinct answer's log-likelihood after
    # the bare question (verifier.likelihood). The last two extract no text features.
    input: str = "text"
    # The task's difficulty preset when one was asked for (None: the task's default); part of
    # the command and of the sample cache's name, so another preset never meets these samples.
    difficulty: str | None = None

    def __post_init__(self) -> None:
        if self.n_problems < MIN_TRAIN_PROBLEMS:
            raise ValueError(
                f"--n-problems {self.n_problems} is too few to hold problems out for "
                f"validation: need >= {MIN_TRAIN_PROBLEMS}"
            )
        if self.test_problems < MIN_TEST_PROBLEMS:
            raise ValueError(f"--test-problems must be >= {MIN_TEST_PROBLEMS}")
        if self.samples < 2:
            raise ValueError("--samples must be >= 2: ranking needs several candidates")
        if not 0.0 < self.temperature <= 2.0:
            raise ValueError("--temperature must be in (0, 2]: greedy samples are all equal")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("--top-p must be in (0, 1]")
        if self.max_tokens < 8:
            raise ValueError("--max-tokens must be >= 8")
        if self.folds < 2:
            raise ValueError("--folds must be >= 2")
        if self.input not in INPUTS:
            raise ValueError(f"--input must be one of {', '.join(INPUTS)}, not {self.input!r}")

    def command(self) -> str:
        parts = [
            "ttscale train-verifier",
            f"--task {self.task}",
            *([f"--difficulty {self.difficulty}"] if self.difficulty else []),
            f"--n-problems {self.n_problems}",
            f"--samples {self.samples}",
            f"--temperature {self.temperature}",
            f"--top-p {self.top_p}",
            f"--max-tokens {self.max_tokens}",
            f"--test-problems {self.test_problems}",
            f"--folds {self.folds}",
            f"--epochs {self.epochs}",
            f"--seed {self.seed}",
            f"--input {self.input}",
        ]
        if self.layers:
            parts.append(f"--layers {','.join(map(str, self.layers))}")
        parts.append(f"--out {self.out}")
        return " ".join(parts)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Every third layer from the middle on, and the final (normed) output: the middle and late
    layers are where probes of correctness work best (Azaria & Mitchell 2023; Orgad et al.
    2024). Index ``num_layers`` is the final norm's output (the engine's convention)."""
    return tuple(sorted({*range(num_layers // 3, num_layers, 3), num_layers}))


def _dataset_path(run: VerifierRun, task: Task, seed: int) -> Path:
    name = f"{task.name}_{run.difficulty}" if run.difficulty else task.name
    tag = f"{name}_T{run.temperature}_p{run.top_p}_k{run.samples}_m{run.max_tokens}"
    return Path(run.data_dir) / f"{tag}_s{seed}.jsonl"


def _features(
    llm: LLM, items: list, path: Path, layers: Sequence[int], log: Callable[[str], None]
) -> torch.Tensor:
    """Features from the cache next to the dataset, or computed with the engine and cached."""
    cache = path.with_suffix(f".n{len(items)}.l{'-'.join(map(str, layers))}.safetensors")
    if cache.is_file():
        return load_file(str(cache))["features"]
    t0 = time.perf_counter()
    feats = extract_features(llm, items, layers, POOLINGS, log)
    save_file({"features": feats.contiguous()}, str(cache))
    log(f"features {tuple(feats.shape)} in {time.perf_counter() - t0:.0f} s -> {cache}")
    return feats


def train_verifier(
    llm: LLM, task: Task, run: VerifierRun, log: Callable[[str], None] = print
) -> tuple[Probe, dict[str, Any]]:
    """Runs everything and saves the probe to ``run.out``; returns it and its report."""
    t_start = time.perf_counter()
    # Bad input before any sampling: no references (no labels), or no disjoint test set.
    check_split(task, run.n_problems, run.test_problems)
    layers = run.layers or default_layers(llm.config.num_hidden_layers)
    if max(layers) > llm.config.num_hidden_layers or min(layers) < 0:
        raise ValueError(f"layers must be in 0..{llm.config.num_hidden_layers}")
    base = TrainConfig(epochs=run.epochs, seed=run.seed)

    splits = {}
    for split, seed, n in (
        ("train", TRAIN_SEED_BASE, run.n_problems),
        ("test", TEST_SEED, run.test_problems),
    ):
        path = _dataset_path(run, task, seed)
        t0 = time.perf_counter()
        items = build_dataset(
            llm,
            task,
            n,
            run.samples,
            run.temperature,
            path,
            top_p=run.top_p,
            max_tokens=run.max_tokens,
            seed=seed,
            log=log,
        )
        log(f"{split}: {n} problems x {run.samples} samples ({time.perf_counter() - t0:.0f} s)")
        splits[split] = (items, path)
    unseen = _unseen_test_problems(splits, log)
    if run.input in ("answer", "likelihood"):
        splits["test"] = ([splits["test"][0][i] for i in unseen], splits["test"][1])
        return _train_answer_probe(llm, task, run, splits, layers, base, log, t_start)
    tables = {
        split: FeatureTable(
            items, _features(llm, items, path, layers, log), POOLINGS, tuple(layers)
        )
        for split, (items, path) in splits.items()
    }
    tables["test"] = _keep_problems(tables["test"], unseen)

    log("search (grouped cross-validation on training problems):")
    trials = search(tables["train"], base, folds=run.folds, seed=run.seed, log=log)
    best = trials[0]
    head, report = fit_and_test(tables["train"], tables["test"], best.spec, best.config)
    test = report["probe"]
    card = {
        **_card_header(llm, task, "outcome probe"),
        "features": {"pooling": best.spec.pooling, "layers": list(best.spec.layers)},
        "head": _card_head(best.config, int(tables["train"].matrix(best.spec).shape[1])),
        "data": _card_data(run, len(tables["train"].labels), len(tables["test"].labels)),
        "search": {
            "folds": run.folds,
            "criterion": "within-problem AUROC, out of fold",
            "trials": [t.row() for t in trials],
        },
        "metrics": {
            "test": test,
            "test_hygiene": report["probe_hygiene"],
            "test_logprob_baseline": report["logprob"],
        },
        **_card_footer(run, t_start),
    }
    probe = Probe(head, best.spec, card)
    probe.save(run.out)
    log(f"saved {run.out}")
    return probe, card


def _card_header(llm: LLM, task: Task, kind: str) -> dict[str, Any]:
    return {
        "version": CARD_VERSION,
        "kind": kind,
        "model": {
            "id": Path(str(llm.source)).name,
            "hash": model_hash(llm.source),
            "architecture": llm.config.architecture,
            "hidden_size": llm.config.hidden_size,
            "num_hidden_layers": llm.config.num_hidden_layers,
        },
        "tokenizer": {"vocab_size": llm.tokenizer.vocab_size},
        "task": {
            "name": task.name,
            "family": task.family,
            "difficulty": getattr(task, "difficulty", None),
        },
    }


def _card_head(config: TrainConfig, dim: int) -> dict[str, Any]:
    return {
        "type": config.head,
        "dim": dim,
        "hidden": config.hidden,
        "loss": config.loss,
        "epochs": config.epochs,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
    }


def _unseen_test_problems(
    splits: dict[str, tuple[list, Path]], log: Callable[[str], None]
) -> list[int]:
    """Indices of the test problems whose question no training problem asks. Generators repeat
    questions across seeds (two-term sums do, often): a test on them would reward a head that
    memorized questions, which is not what it will meet."""
    asked = {it.question for it in splits["train"][0]}
    test = splits["test"][0]
    keep = [i for i, it in enumerate(test) if it.question not in asked]
    log(f"test: {len(test) - len(keep)} of {len(test)} problems ask a training question: left out")
    if len(keep) < MIN_TEST_PROBLEMS:
        raise ValueError(
            f"only {len(keep)} test problems ask questions the training problems do not: "
            f"too few to hold out (need >= {MIN_TEST_PROBLEMS}); ask for more --test-problems"
        )
    return keep


def _keep_problems(table: FeatureTable, keep: Sequence[int]) -> FeatureTable:
    """The table restricted to the problems at ``keep`` (their candidates' feature rows)."""
    starts = np.cumsum([0] + [len(it.candidates) for it in table.items])
    rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep])
    return FeatureTable(
        [table.items[i] for i in keep],
        table.feats[torch.from_numpy(rows)],
        table.poolings,
        table.layers,
    )


def _card_data(run: VerifierRun, n_train_rows: int, n_test_rows: int) -> dict[str, Any]:
    rows = "n_candidates" if run.input == "text" else "n_answers"
    return {
        "sampling": {
            "temperature": run.temperature,
            "top_p": run.top_p,
            "max_tokens": run.max_tokens,
            "samples": run.samples,
        },
        "train": {
            "problem_seed": TRAIN_SEED_BASE,
            "n_problems": run.n_problems,
            rows: n_train_rows,
        },
        "test": {
            "problem_seed": TEST_SEED,
            "n_problems": run.test_problems,
            "scored": "the problems whose question no training problem asks",
            rows: n_test_rows,
        },
        "note": "problems are task.problems(n, seed); evaluations use other seeds; "
        "cross-validation folds keep repeated questions together",
    }


def _card_footer(run: VerifierRun, t_start: float) -> dict[str, Any]:
    return {
        "command": run.command(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _train_answer_probe(
    llm: LLM,
    task: Task,
    run: VerifierRun,
    splits: dict[str, tuple[list, Path]],
    layers: Sequence[int],
    base: TrainConfig,
    log: Callable[[str], None],
    t_start: float,
) -> tuple[Probe, dict[str, Any]]:
    """Answer features of both splits (restatements' hidden states, or likelihoods), the
    search on training problems, one test."""
    likelihood = run.input == "likelihood"
    questions = [it.question for it in splits["train"][0]]

    def train_search(table: AnswerTable) -> list[AnswerTrial]:
        return search_answer_probe(
            table,
            run.n_problems,
            base,
            folds=run.folds,
            seed=run.seed,
            log=log,
            questions=questions,
        )

    if likelihood:
        # What follows the question is a choice the training problems make: how a task's
        # questions end decides which continuation reads as an answer to this model.
        searched: dict[str, tuple[AnswerTable, list[AnswerTrial]]] = {}
        for candidate in LIKELIHOOD_TEMPLATES:
            t0 = time.perf_counter()
            table = likelihood_table(llm, splits["train"][0], candidate, log)
            log(f"template {candidate!r}: train likelihoods in {time.perf_counter() - t0:.0f} s")
            searched[candidate] = (table, train_search(table))
        template = min(searched, key=lambda t: rank_trial(searched[t][1][0]))  # best first
        tables = {"train": searched[template][0]}
        tables["test"] = likelihood_table(llm, splits["test"][0], template, log)
        trials = searched[template][1]
        log(f"chosen template {template!r}")
    else:
        template = RESTATE_TEMPLATE
        tables = {}
        for split, (items, _) in splits.items():
            t0 = time.perf_counter()
            tables[split] = answer_table(llm, items, layers, template, log)
            log(f"{split}: answer features in {time.perf_counter() - t0:.0f} s")
        log("search (grouped cross-validation on training problems, top-1 answer accuracy):")
        trials = train_search(tables["train"])
    best = trials[0]
    n_test = len(splits["test"][0])
    head, report = fit_and_test_answers(
        tables["train"], tables["test"], n_test, best.layers, best.config
    )
    log(f"test: {report}")
    # A likelihood probe reads the LM head's output: the final norm's states.
    spec_layers = (llm.config.num_hidden_layers,) if likelihood else best.layers
    spec = FeatureSpec("mean", spec_layers, run.input, template)
    card = {
        **_card_header(llm, task, f"{run.input} probe"),
        "features": {
            "input": run.input,
            "template": template,
            "pooling": "mean",
            "layers": list(spec_layers),
            "extra": list(LIKELIHOOD_FEATURES) if likelihood else ["log vote count"],
        },
        "head": _card_head(best.config, int(tables["train"].matrix(best.layers).shape[1])),
        "data": _card_data(run, len(tables["train"].labels), len(tables["test"].labels)),
        "search": {
            "folds": run.folds,
            "criterion": "top-1 answer accuracy out of fold (within-problem AUROC on ties)",
            "trials": [t.row() for t in trials],
            **({"templates": {t: searched[t][1][0].row() for t in searched}} if likelihood else {}),
        },
        "metrics": {"test": report},
        **_card_footer(run, t_start),
    }
    probe = Probe(head, spec, card)
    probe.save(run.out)
    log(f"saved {run.out}")
    return probe, card
