"""`train-quality` and `train-toxicity` Prefect flows: fastText classifiers trained on Ray, with held-out scores.

Training runs as a Ray task in a fresh worker process with retries (`workers.filter.train_fasttext`). The model
is written next to its final path and renamed into place, with `<model>.json` holding the held-out precision,
recall and accuracy, the data it was trained on and the options.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from dataprep.filter.config import TrainQualityConfig
from dataprep.filter.fasttext_models import FastTextClassifier, precision_recall, write_training_file
from dataprep.filter.training_data import chunk_words, read_jigsaw, read_texts, split_holdout
from dataprep.shards import atomic_write_json
from flows.config import RayConfig
from workers.filter import train_fasttext
from workers.ray_runtime import init_ray


def metrics_path(model: Path) -> Path:
    return model.with_name(model.name + ".json")


@task(name="train-fasttext", cache_policy=NO_CACHE)
def train_classifier(examples: list[tuple[str, str]], output: Path, positive: str, holdout: float, seed: int,
                     options: dict[str, Any], quantize: bool, ray_config: RayConfig, source: dict[str, Any]
                     ) -> dict[str, Any]:
    """Split, train on Ray (fresh process, retried), score the held-out part, publish model + metrics."""
    init_ray(ray_config.address, temp_dir=ray_config.temp_dir or Path(tempfile.gettempdir()) / "forgeline-ray",
             num_cpus=ray_config.num_cpus)
    train, held_out = split_holdout(examples, holdout, seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".train-") as work:
        train_file = Path(work) / "train.txt"
        write_training_file(train_file, train)
        # one thread: fastText's multi-threaded SGD is not reproducible, and these sets train in seconds
        trained = train_fasttext(train_file, Path(work) / output.name, quantize, {"seed": seed, "thread": 1, **options})
        scores = precision_recall(FastTextClassifier.load(trained), held_out, positive)
        os.replace(trained, output)
    metrics = {"model": str(output), "positive_label": positive, "held_out": scores, "train_examples": len(train),
               "options": options, "quantized": quantize, "seconds": round(time.time() - started, 2), **source}
    atomic_write_json(metrics_path(output), metrics)
    return metrics


def _report(title: str, metrics: dict[str, Any]) -> None:
    held = metrics["held_out"]
    create_markdown_artifact(
        key=title.replace(" ", "-").lower(),
        markdown=(f"# {title}\n\nModel: `{metrics['model']}`\n\n| held-out examples | positives | precision | "
                  f"recall | accuracy |\n|---:|---:|---:|---:|---:|\n| {held['examples']:.0f} | "
                  f"{held['positives']:.0f} | {held['precision']:.3f} | {held['recall']:.3f} | "
                  f"{held['accuracy']:.3f} |\n"),
    )
    get_run_logger().info("%s: %s", title, json.dumps(held))


def _balanced(positives: list[str], negatives: list[str], config: TrainQualityConfig) -> list[tuple[str, str]]:
    count = min(len(positives), len(negatives), config.max_examples)
    if count < 5:
        raise ValueError(f"train_quality needs at least 5 texts per class; got {len(positives)} positives and "
                         f"{len(negatives)} negatives")
    return ([(config.positive_label, t) for t in positives[:count]]
            + [(config.negative_label, t) for t in negatives[:count]])


@flow(name="train-quality", log_prints=True)
def train_quality_flow(config: TrainQualityConfig, negatives: list[str], ray_config: RayConfig) -> dict[str, Any]:
    """Reference texts (positives) against crawl texts (negatives) → a fastText quality model."""
    positive_texts = chunk_words(read_texts(config.positives))[: config.max_examples]
    negative_texts = chunk_words(read_texts(config.negatives or negatives))[: config.max_examples]
    examples = _balanced(positive_texts, negative_texts, config)
    source = {"positives": config.positives, "negatives": config.negatives or negatives}
    metrics = train_classifier(examples, config.output, config.positive_label, config.holdout, config.seed,
                               {"epoch": config.epoch, "wordNgrams": config.word_ngrams, "lr": config.lr,
                                "bucket": config.bucket, "dim": config.dim}, config.quantize, ray_config, source)
    _report("quality classifier", metrics)
    return metrics


@flow(name="train-toxicity", log_prints=True)
def train_toxicity_flow(labels_csv: Path, output: Path, ray_config: RayConfig, holdout: float = 0.2,
                        epoch: int = 25, seed: int = 0, quantize: bool = True) -> dict[str, Any]:
    """A Jigsaw-layout CSV (`comment_text`, `toxic`) → a fastText toxicity model (labels toxic / clean)."""
    examples = read_jigsaw(labels_csv)
    if not {label for label, _ in examples} >= {"toxic", "clean"}:
        raise ValueError(f"{labels_csv}: needs both toxic and clean examples")
    options = {"epoch": epoch, "wordNgrams": 1, "lr": 0.5, "minCount": 1, "dim": 50}
    metrics = train_classifier(examples, output, "toxic", holdout, seed, options, quantize, ray_config,
                               {"labels": str(labels_csv)})
    _report("toxicity classifier", metrics)
    return metrics
