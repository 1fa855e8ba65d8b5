"""`weakseg sweep CONFIG --seeds 0 1 2 [key=v1,v2 ...] [--out DIR]`: every combination of
the grid values, each trained with every seed, reported as mean ± sample std over the seeds.

    OUT/<combination>/seed<k>/   one job: a `weakseg run` of the config (its steps; a config
                                 of train_cam + infer_cam is a CAM sweep)
    OUT/sweep.json               grid, seeds, every job's stage metrics and their aggregation
    OUT/sweep.csv                one row per combination x stage: n, mean and std per metric
    OUT/sweep.md                 the markdown table, cells `mean ± std` in percent

`<combination>` is `base` without grid keys, else `key=value` parts joined by `__` (made safe
for a file name; a short hash is added when that changed or shortened the text).

Finished jobs are reused when the same sweep runs again, by the pipeline's own `done.json` per
step (weakseg.steps.base), so a changed key re-runs exactly what depends on it. Each trainer
the config runs gets the job's seed (`<step>.train.seed`). Single WSSS runs vary by about 2 mIoU between seeds, which is why this exists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from weakseg.config import parse_override
from weakseg.data.io import write_text_atomic
from weakseg.errors import ConfigError
from weakseg.record import run_record

# Stages in the order the pipeline produces them; a CAM config has the first only.
STAGES = ("cam", "refined", "pseudo_labels", "final")
METRICS = ("miou", "contour_f", "jf", "boundary_iou")
METRIC_HEADERS = {"miou": "J", "contour_f": "F", "jf": "J&F", "boundary_iou": "boundary IoU"}


# ---------------------------------------------------------------- grid parsing (pure)


def split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quotes: `[0.5,1.0],[1.0]` is two parts.
    Unbalanced brackets or an unclosed quote raise ValueError (the caller names the item)."""
    parts, current, depth, quote = [], [], 0, None
    for char in text:
        if quote is not None:
            current.append(char)
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char in "[{":
            depth += 1
            current.append(char)
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched {char!r}")
            current.append(char)
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quote is not None:
        raise ValueError(f"unclosed quote {quote}")
    if depth != 0:
        raise ValueError("unclosed bracket")
    parts.append("".join(current))
    return parts


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """`["a.b=1,2", "c=[0.5,1.0],[1.0]"]` -> `{"a.b": [1, 2], "c": [[0.5, 1.0], [1.0]]}`.

    Each value is parsed as YAML, exactly as a single `key=value` override is
    (`weakseg.config.parse_override`), so `1` is an int, `1.0` a float, `true` a bool and
    `[1, 2]` a list. Keys keep the order given (it is the order of the grid's columns)."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"sweep item {item!r}: expected key=value1,value2,...")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"sweep item {item!r}: empty key")
        if key in grid:
            raise ConfigError(f"sweep item {item!r}: key {key} is given twice; list all its values in one item")
        try:
            pieces = split_top_level(raw)
        except ValueError as exc:
            raise ConfigError(f"sweep item {item!r}: {exc}") from None
        values = []
        for piece in pieces:
            if not piece.strip():
                raise ConfigError(f"sweep item {item!r}: empty value (values are separated by single commas)")
            # parse_override gives the same YAML reading (and error message) as `weakseg run`.
            values.append(parse_override(f"{key}={piece.strip()}")[1])
        grid[key] = values
    return grid


def combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Cartesian product, the first key varying slowest; one empty combination without keys."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def value_text(value: Any) -> str:
    """One-line YAML of a value that `parse_override` reads back as the same value (a float
    like 1e-05 is written 1.0e-05, which YAML 1.1 reads as a float; a string `true` is
    quoted). Used both to pass values on as overrides and to show them in tables."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    if text.endswith("\n..."):  # the document-end marker PyYAML adds after a bare scalar
        text = text[: -len("\n...")].strip()
    elif text.endswith("..."):
        text = text[: -len("...")].strip()
    return text


_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-\[\]]")
_SLUG_LIMIT = 96


def combination_slug(combination: dict[str, Any]) -> str:
    """Folder name of a combination. Readable where possible; when characters had to be
    replaced, a value does not read back as itself, or the text was cut, a hash of the exact
    combination is appended, so two different combinations never share a folder."""
    if not combination:
        return "base"
    parts, lossless = [], True
    for key, value in combination.items():
        # Compact JSON for lists/mappings ([0.5,1.0], no spaces), the plain text for scalars.
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        try:
            lossless = lossless and yaml.safe_load(text) == value and type(yaml.safe_load(text)) is type(value)
        except yaml.YAMLError:
            lossless = False
        parts.append(f"{key}={text}")
    joined = "__".join(parts)
    safe = _UNSAFE.sub("_", joined)
    if safe != joined or not lossless or len(safe) > _SLUG_LIMIT:
        digest = hashlib.sha256(json.dumps(combination, sort_keys=True, default=str).encode()).hexdigest()[:8]
        safe = f"{safe[:_SLUG_LIMIT]}-{digest}"
    return safe


def split_cli_args(tokens: Sequence[str]) -> tuple[list[int], list[str]]:
    """`--seeds 0 1 2 a=1,2 b=x` -> ([0, 1, 2], ["a=1,2", "b=x"]). The command line passes
    `--seeds` through untouched, because Click options take a fixed number of values; grid
    items always hold `=`, seeds never do, so the two cannot be confused."""
    seeds: list[int] = []
    items: list[str] = []
    seen_seeds = in_seeds = False
    for token in tokens:
        if token == "--seeds":
            if seen_seeds:
                raise ConfigError("--seeds is given twice; list all seeds after one --seeds")
            seen_seeds = in_seeds = True
        elif "=" in token and not token.startswith("-"):
            items.append(token)
            in_seeds = False
        elif in_seeds and re.fullmatch(r"-?\d+", token):
            seeds.append(int(token))
        elif token.startswith("-"):
            raise ConfigError(f"{token}: unknown option (sweep takes --seeds and --out)")
        else:
            raise ConfigError(f"{token!r}: expected a seed after --seeds or a key=value1,value2 grid item")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0 1 2")
    return seeds, items


# ---------------------------------------------------------------- aggregation (pure)


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1 in the denominator, `statistics.stdev`) of
    the values that exist. The std of one value is None (undefined), not 0.0: a single seed
    says nothing about the spread; no value at all gives mean None too."""
    present = [float(v) for v in values if v is not None]
    n = len(present)
    return {
        "mean": statistics.mean(present) if n else None,
        "std": statistics.stdev(present) if n > 1 else None,
        "n": n,
    }


def aggregate_jobs(jobs: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Jobs of one combination (`{"seed": k, "stages": {stage: {metric: value}}}`) ->
    `{stage: {metric: {"mean", "std", "n", "per_seed": {"k": value}}}}`, stages in pipeline
    order, metrics in METRICS order; a stage or metric absent from every job is left out."""
    result: dict[str, dict[str, dict]] = {}
    present_stages = {stage for job in jobs for stage in job["stages"]}
    ordered = [s for s in STAGES if s in present_stages] + sorted(present_stages - set(STAGES))
    for stage in ordered:
        metrics: dict[str, dict] = {}
        for metric in METRICS:
            per_seed = {str(job["seed"]): job["stages"].get(stage, {}).get(metric) for job in jobs}
            if all(v is None for v in per_seed.values()):
                continue
            metrics[metric] = {**mean_std(per_seed.values()), "per_seed": per_seed}
        result[stage] = metrics
    return result


def format_cell(mean: float | None, std: float | None) -> str:
    """`0.4123, 0.0207` -> `41.2 ± 2.1` (percent, one decimal); no std (one seed) -> `41.2`;
    no value -> `n/a`."""
    if mean is None:
        return "n/a"
    if std is None:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _cell_text(value: Any) -> str:
    return value_text(value).replace("|", "\\|")  # a pipe would end the markdown cell


def markdown_table(grid_keys: Sequence[str], rows: Sequence[dict]) -> str:
    """`rows`: the `combinations` entries of sweep.json (each with `combination` and
    `stages`). One table row per combination x stage."""
    header = [*grid_keys, "stage", *(METRIC_HEADERS[m] for m in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        for stage, metrics in row["stages"].items():
            cells = [_cell_text(row["combination"][k]) for k in grid_keys] + [stage]
            for metric in METRICS:
                entry = metrics.get(metric)
                cells.append(format_cell(entry["mean"], entry["std"]) if entry else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(grid_keys: Sequence[str], rows: Sequence[dict]) -> str:
    """One line per combination x stage: the grid values, stage, n (seeds with that stage),
    and `<metric>_mean`, `<metric>_std` as fractions (not percent), empty where undefined."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*grid_keys, "stage", "n", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])
    for row in rows:
        for stage, metrics in row["stages"].items():
            n = max((entry["n"] for entry in metrics.values()), default=0)
            cells: list[Any] = [value_text(row["combination"][k]) for k in grid_keys] + [stage, n]
            for metric in METRICS:
                entry = metrics.get(metric) or {}
                cells += ["" if entry.get("mean") is None else repr(entry["mean"]),
                          "" if entry.get("std") is None else repr(entry["std"])]
            writer.writerow(cells)
    return buffer.getvalue()


# ---------------------------------------------------------------- the jobs


def _plain(value: Any) -> Any:
    """JSON round trip: the form a config has after being recorded, for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _pipeline_job(config_path: Path, overrides: list[str], job: Path, log: Callable[[str], None]) -> dict:
    from weakseg.steps import pipeline

    # The pipeline's done.json per step decides what is reused; its log says which ran.
    summary = pipeline.run(config_path, [*overrides, f"out={value_text(str(job))}"],
                           log=lambda line: log(f"{job}: {line}"))
    return summary["stages"]


def run(
    config_path: str | Path,
    seeds: Sequence[int],
    grid_items: Sequence[str],
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every combination x seed (reusing finished jobs), write sweep.json / .csv / .md
    into OUT and return what sweep.json holds."""
    config_path = Path(config_path)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated (it would count one run twice)")
    grid = parse_grid(grid_items)
    from weakseg.steps import pipeline

    loader, job_runner = pipeline.load_config, _pipeline_job
    base_config, _ = loader(config_path)
    # The trainers this config runs; an absent step's seed is not set (that would add the step).
    seeds_at = pipeline.sweep_seed_keys(base_config)
    for key in grid:
        if key == "out":
            raise ConfigError("sweep item out=...: each job's out is set by the sweep; use --out")
        if key in seeds_at:
            raise ConfigError(f"sweep item {key}=...: seeds come from --seeds (which sets {', '.join(seeds_at)})")
    out_dir = Path(out) if out is not None else Path(str(base_config.out) + "_sweep")

    combos = combinations(grid)
    slugs = [combination_slug(c) for c in combos]
    if len(set(slugs)) != len(slugs):
        raise ConfigError("sweep: two combinations have the same values; give each value once per key")
    # Every combination is loaded (and so checked) before any training: a misspelt key
    # fails now, not after hours of other jobs.
    for combo in combos:
        loader(config_path, [f"{k}={value_text(v)}" for k, v in combo.items()])

    record_config = {"config": str(config_path.resolve()), "seeds": seeds, "grid": grid}
    with run_record(out_dir, "sweep", record_config):
        return _run_jobs(config_path, seeds, grid, combos, slugs, seeds_at, out_dir, job_runner, log)


def _run_jobs(config_path: Path, seeds: list[int], grid: dict, combos: list[dict], slugs: list[str],
              seeds_at: list[str], out_dir: Path, job_runner, log: Callable[[str], None]) -> dict:
    entries = []
    for combo, slug in zip(combos, slugs):
        overrides = [f"{k}={value_text(v)}" for k, v in combo.items()]
        jobs = []
        for seed in seeds:
            job = out_dir / slug / f"seed{seed}"
            log(f"sweep: {slug} seed {seed} -> {job}")
            seed_overrides = [f"{key}={seed}" for key in seeds_at]  # every trainer of the run
            stages = job_runner(config_path, overrides + seed_overrides, job, log)
            jobs.append({"seed": seed, "dir": str(job), "stages": _plain(stages)})
        entries.append({"combination": combo, "slug": slug, "jobs": jobs, "stages": aggregate_jobs(jobs)})

    result = {
        "config": str(config_path),
        "seeds": seeds,
        "grid": grid,
        "seed_keys": seeds_at,
        "std": "sample standard deviation over seeds (n - 1); null with one seed",
        "combinations": entries,
    }
    keys = list(grid)
    table = markdown_table(keys, entries)
    # default=str: a YAML value with no JSON form (a date) is recorded as its text.
    write_text_atomic(out_dir / "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text_atomic(out_dir / "sweep.csv", csv_text(keys, entries))
    seed_list = ", ".join(map(str, seeds))
    write_text_atomic(out_dir / "sweep.md", f"Sweep of `{config_path}`, seeds {seed_list}: mean ± sample std over "
                                            f"the seeds, in percent.\n\n{table}")
    return result
