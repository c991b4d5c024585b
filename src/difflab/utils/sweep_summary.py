"""One row per job of a Hydra multirun, readable by a person: ``sweep_summary.csv`` and ``sweep_summary.md`` in the
sweep dir, for any sweep (basic sweeper, Optuna, SLURM through submitit).

The contract between the two sides is a file per job: a task writes ``run_summary.json`` into its run dir
(:func:`write_run_summary`: status, final metrics, parameters, Gflops, images/s, wall time); :class:`SweepSummary`,
a Hydra callback wired in ``conf/hydra/default.yaml``, reads every job dir of the sweep (its
``.hydra/overrides.yaml`` and ``run_summary.json``) and writes the table. It rewrites the table after each job
(so a sweep that stops half-way still has one, and a failed job gets a ``failed`` row with its error) and once more
when the sweep ends. Hydra has no such table; its Optuna sweeper writes only the best parameters.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from difflab.utils.paths import write_text_atomic

RUN_SUMMARY = "run_summary.json"
# run_summary.json fields that become columns, in this order (metrics follow, sorted): a training run's, then a
# sampling run's (sample.py); a column no row fills is left out of the tables
FIELDS = (
    "params",
    "gflops_per_forward",
    "train_images",
    "train_images_per_s",
    "sampler",
    "steps",
    "nfe",
    "guidance_scale",
    "num_samples",
    "samples_per_s",
    "wall_time_s",
    "output",
)


def write_run_summary(output_dir: str | Path, **record: Any) -> Path:
    """Write ``<output_dir>/run_summary.json``: ``status`` (default ``ok``), ``metrics`` (name → float) and the
    :data:`FIELDS` a task knows; non-finite floats become null (JSON has no NaN)."""
    record = {"status": "ok", **record}

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and not math.isfinite(value) else value

    path = Path(output_dir) / RUN_SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(clean(record), indent=2, sort_keys=True))
    return path


def _job_number(job_dir: Path) -> tuple[int, str]:
    hydra_file = job_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num")
        if isinstance(num, int):
            return num, str(job_dir)
    number = re.match(r"\d+", job_dir.name)  # job_dirname: <num>_<overrides>
    return (int(number.group()) if number else 1 << 30), str(job_dir)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """A row per job dir under ``sweep_dir`` (every dir holding ``.hydra/overrides.yaml``), in job order."""
    rows = []
    job_dirs = sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}, key=_job_number)
    for job_dir in job_dirs:
        overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
        summary_file = job_dir / RUN_SUMMARY
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"status": "no summary"}
        rows.append(
            {
                "job": job_dir.relative_to(sweep_dir).as_posix() or ".",
                "overrides": overrides,
                "status": summary.get("status", "ok"),
                "error": summary.get("error"),
                "fields": {k: summary.get(k) for k in FIELDS},
                "metrics": summary.get("metrics") or {},
            }
        )
    return rows


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """(override keys, the FIELDS some row has, metrics)."""
    keys: dict[str, None] = {}
    metrics: set[str] = set()
    for row in rows:
        keys.update((_split(o)[0], None) for o in row["overrides"])
        metrics.update(row["metrics"])
    fields = [f for f in FIELDS if any(row["fields"].get(f) is not None for row in rows)]
    return list(keys), fields, sorted(metrics)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Every override key, field and metric as a column (the full override list too)."""
    keys, fields, metrics = _columns(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["job", "status", "overrides", *keys, *fields, *metrics, "error"])
    for row in rows:
        given = dict(_split(o) for o in row["overrides"])
        writer.writerow(
            [row["job"], row["status"], " ".join(row["overrides"])]
            + [given.get(k, "") for k in keys]
            + [_fmt(row["fields"].get(f)) for f in fields]
            + [_fmt(row["metrics"].get(m)) for m in metrics]
            + [row["error"] or ""]
        )
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """A table with the overrides that differ between jobs as columns; those shared by all listed once above."""
    keys, fields, metrics = _columns(rows)
    given = [dict(_split(o) for o in row["overrides"]) for row in rows]
    varying = [k for k in keys if len({g.get(k) for g in given}) > 1]
    shared = [f"{k}={given[0][k]}" for k in keys if k not in varying and k in given[0]]
    lines = [f"# {title}", ""]
    if shared:
        lines += ["Overrides of every job: `" + " ".join(shared) + "`", ""]
    header = ["job", "status", *varying, *fields, *metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, g in zip(rows, given, strict=True):
        cells = [row["job"], row["status"], *(g.get(k, "") for k in varying)]
        cells += [_fmt(row["fields"].get(f)) for f in fields] + [_fmt(row["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [row for row in rows if row["error"]]
    lines += ["", *(f"- job {row['job']}: {row['error']}" for row in failed)] if failed else []
    return "\n".join(lines) + "\n"


def write_sweep_summary(sweep_dir: str | Path, name: str = "sweep_summary") -> list[dict[str, Any]]:
    """Write ``<sweep_dir>/<name>.csv`` and ``.md`` from the job dirs found there; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_jobs(sweep_dir)
    if rows:
        write_text_atomic(sweep_dir / f"{name}.csv", to_csv(rows))
        write_text_atomic(sweep_dir / f"{name}.md", to_markdown(rows, f"Sweep {sweep_dir}"))
    return rows


def _strip_parts(path: Path, relative: str) -> Path:
    """``path`` without the trailing components of ``relative`` (a job dir → its sweep dir)."""
    return Path(*path.parts[: len(path.parts) - len(Path(relative).parts)])


JOB_DIRNAME_MAX = 120  # characters of the overrides kept in a job dir's name (file systems allow 255 bytes)


def _command_line_overrides() -> set[str]:
    """The overrides on this process's command line, verbatim and as Hydra's sweepers write a job's (``x=False``
    for ``x=false``); sweeps (``a=1,2``, ``interval(...)``) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = set(sys.argv[1:])
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a and a[0] != "-"])
    except Exception:  # not a Hydra command line (a test's, a launcher's): the verbatim strings only
        return given
    return given | {
        f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in parsed if not o.is_sweep_override()
    }


def job_dirname(num: int, *, _root_: DictConfig) -> str:
    """``${job_dirname:${hydra.job.num}}``: a multirun job's folder, named by the overrides that make it differ from
    the other jobs (``3_callbacks.ema.decay-0.999+model.optimizer.lr-0.0003``): its ``hydra.overrides.task`` less
    those given verbatim on the command line (the same in every job; a sweep's ``a=1,2`` or an Optuna trial's values
    are not) and less ``hydra.job.config.override_dirname.exclude_keys``, each ``key=value`` written ``key-value``
    and joined by ``+``: no ``=`` nor ``,``, so a path into the folder can be passed back as ``ckpt=PATH`` unquoted
    (Hydra's grammar splits at those). The job number keeps names unique and non-empty; long decimals are shown to 4
    digits (the exact values are in the job's ``.hydra/overrides.yaml``); characters other than letters, digits and
    ``._+-@`` (``/`` in a path value) become ``_``, cut at :data:`JOB_DIRNAME_MAX`, so the name is always one safe
    path component."""
    hydra_cfg = _root_.hydra
    exclude = set(OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys", default=[]) or [])
    given = _command_line_overrides()
    varying = sorted(
        str(o)
        for o in hydra_cfg.overrides.task
        if str(o) not in given and _split(str(o))[0].lstrip("+~") not in exclude
    )
    pairs = ("-".join(_split(o)) if "=" in o else o for o in varying)
    name = re.sub(r"\d+\.\d{5,}(e-?\d+)?", lambda m: f"{float(m.group()):.4g}", "+".join(pairs))  # Optuna's floats
    safe = re.sub(r"[^A-Za-z0-9._+\-@]", "_", name)[:JOB_DIRNAME_MAX]
    return f"{num}_{safe}" if safe else str(num)


def sweep_name(default: str) -> str:
    """``${sweep_name:DEFAULT}``: in a multirun job, ``<DEFAULT>_<sweep dir name>`` (e.g. the wandb group of every job
    of one sweep: ``train_2026-12-01_18-30-00``); ``DEFAULT`` in a single run or outside Hydra. Read from the job's
    own dir (re-resolving ``hydra.sweep.dir`` would claim a new ``unique_dir``)."""
    if not HydraConfig.initialized():
        return default
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or not hydra_cfg.runtime.output_dir:
        return default
    try:
        subdir = str(hydra_cfg.sweep.subdir)
    except OmegaConfBaseException:  # a config composed outside a launch (no hydra.job.num): not a job of a sweep
        return default
    return f"{default}_{_strip_parts(Path(hydra_cfg.runtime.output_dir), subdir).name}"


class SweepSummary(Callback):
    """Hydra callback: after each job of a multirun and when the sweep ends, (re)write the sweep's summary table.

    ``conf/hydra/default.yaml`` wires it for every entry point; it does nothing in single runs. A job that raised
    (and so wrote no ``run_summary.json``) gets one with ``status: failed`` and the error.
    """

    def __init__(self, name: str = "sweep_summary") -> None:
        self.name = name

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(hydra_cfg.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and not (job_dir / RUN_SUMMARY).is_file():
            error = job_return._return_value  # the exception (the public property re-raises it)
            write_run_summary(job_dir, status="failed", error=f"{type(error).__name__}: {error}")
        # the sweep dir from the job dir (in a remote job, re-resolving ${now:...} would name another dir)
        write_sweep_summary(_strip_parts(job_dir, str(hydra_cfg.sweep.subdir)), self.name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_summary(Path(str(config.hydra.sweep.dir)), self.name)
