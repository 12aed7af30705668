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

import torch
from safetensors.torch import load_file, save_file

from ttscale.verifier.data import (
    DATA_DIR,
    TEST_SEED,
    TRAIN_SEED_BASE,
    build_dataset,
    check_split,
)
from ttscale.verifier.features import POOLINGS, extract_features
from ttscale.verifier.fit import FeatureTable, fit_and_test, search
from ttscale.verifier.probe import CARD_VERSION, Probe, model_hash
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

    def command(self) -> str:
        parts = [
            "ttscale train-verifier",
            f"--task {self.task}",
            f"--n-problems {self.n_problems}",
            f"--samples {self.samples}",
            f"--temperature {self.temperature}",
            f"--top-p {self.top_p}",
            f"--max-tokens {self.max_tokens}",
            f"--test-problems {self.test_problems}",
            f"--folds {self.folds}",
            f"--epochs {self.epochs}",
            f"--seed {self.seed}",
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
    tag = f"{task.name}_T{run.temperature}_p{run.top_p}_k{run.samples}_m{run.max_tokens}"
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

    tables = {}
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
        feats = _features(llm, items, path, layers, log)
        tables[split] = FeatureTable(items, feats, POOLINGS, tuple(layers))

    log("search (grouped cross-validation on training problems):")
    trials = search(tables["train"], base, folds=run.folds, seed=run.seed, log=log)
    best = trials[0]
    head, report = fit_and_test(tables["train"], tables["test"], best.spec, best.config)
    test = report["probe"]
    card = {
        "version": CARD_VERSION,
        "kind": "outcome probe",
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
        "features": {"pooling": best.spec.pooling, "layers": list(best.spec.layers)},
        "head": {
            "type": best.config.head,
            "dim": int(tables["train"].matrix(best.spec).shape[1]),
            "hidden": best.config.hidden,
            "loss": best.config.loss,
            "epochs": best.config.epochs,
            "lr": best.config.lr,
            "weight_decay": best.config.weight_decay,
        },
        "data": {
            "sampling": {
                "temperature": run.temperature,
                "top_p": run.top_p,
                "max_tokens": run.max_tokens,
                "samples": run.samples,
            },
            "train": {
                "problem_seed": TRAIN_SEED_BASE,
                "n_problems": run.n_problems,
                "n_candidates": len(tables["train"].labels),
                "positive_rate": float(tables["train"].labels.mean()),
            },
            "test": {
                "problem_seed": TEST_SEED,
                "n_problems": run.test_problems,
                "n_candidates": len(tables["test"].labels),
            },
            "note": "problems are task.problems(n, seed); evaluations use other seeds",
        },
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
        "command": run.command(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    probe = Probe(head, best.spec, card)
    probe.save(run.out)
    log(f"saved {run.out}")
    return probe, card
