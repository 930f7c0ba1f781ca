"""`dcgan compare`: is setting B better than setting A, with error bars.

One GAN run says little: on the digits, three seeds of one recipe scored 4.40, 4.56 and 6.05 (a 40%
spread), more than most differences a user cares about. The harness trains every setting once per seed
(seed s of A and seed s of B start from the same weights, noise and data order), evaluates the
generator each setting asks for, and prints per setting the mean, the standard deviation and a 95%
t-interval, then the paired difference B - A over seeds with its interval: a difference is called only
when that interval excludes zero.

Settings that differ only in how images are made (sample.bn, sample.ema) share their training runs: a
run's directory is named by a hash of the config that training depends on. Runs that exist are
resumed, not repeated, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dcgan.config import LOWER_IS_BETTER, Config, ConfigError, config_to_dict, load_config, metric_keys, replace
from dcgan.distributed.env import DistInfo
from dcgan.errors import EXIT_INTERRUPTED, EXIT_REQUEUE, EXIT_TERMINATED, DcganError
from dcgan.evaluation.recipe import EXPORT as RECIPE_EXPORT
from dcgan.evaluation.recipe import RECIPE, recipe_generator, train_recipe
from dcgan.evaluation.spread import Spread
from dcgan.evaluation.training_child import run_training_child
from dcgan.files import write_text_atomically
from dcgan.run.rundir import RunDir

COMPARISON = "compare.json"
"""What a comparison writes in its --out directory (settings, values, runs, verdict, the printed table);
`dcgan report` draws the directory's curves when it finds one."""
RECIPE_OVERRIDES = [RECIPE]
"""--a / --b as split_overrides gives the keyword that selects the recipe arm."""

GENERATION_ONLY = (("sample", "bn"), ("sample", "ema"))
"""Config keys that change how a trained run makes images, not the training: runs are shared across them."""
NOT_TRAINING = ("run", "log", "eval")
"""Config sections that do not change the trained weights."""
ADDED_LATER = (
    ("optim", "lr_g"),
    ("optim", "lr_d"),
    ("optim", "beta1_g"),
    ("optim", "beta1_d"),
    ("optim", "beta2_g"),
    ("optim", "beta2_d"),
    ("loss", "kind"),
    ("model", "spectral_norm"),
    ("model", "d_norm"),
    ("loss", "augment"),
    ("loss", "r1"),
    ("loss", "r1_every"),
    ("data", "holdout"),
)
"""Training keys added after runs were first named by their identity (issue #38's options): left out of it
at their defaults, so that a comparison started before they existed still finds its runs."""


def training_identity(config: Config) -> str:
    """A short hash of everything the trained weights depend on (what two settings must share to share a run)."""
    data = config_to_dict(config)
    for section in NOT_TRAINING:
        data.pop(section)
    for section, key in GENERATION_ONLY:
        data[section].pop(key)
    defaults = config_to_dict(Config())
    for section, key in ADDED_LATER:
        if data[section][key] == defaults[section][key]:
            data[section].pop(key)
    data = {name: value for name, value in data.items() if value != {}}  # the loss section, all at defaults
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Setting:
    name: str
    overrides: list[str]


def is_recipe(setting: Setting) -> bool:
    """Whether the setting is the pytorch/examples recipe (dcgan.evaluation.recipe) rather than config overrides."""
    return setting.overrides == [RECIPE]


def point_config(config_path: str, common: list[str], setting: Setting, seed: int, root: Path) -> Config:
    """The config of one (setting, seed), its run directory named by its training identity (the recipe
    trains from the common config: its directory says so)."""
    overrides = [] if is_recipe(setting) else setting.overrides
    config = load_config(config_path, [*common, *overrides, f"seed={seed}"])
    kind = f"{RECIPE}-" if is_recipe(setting) else ""
    return replace(config, run={"dir": str(root / f"seed{seed}-{kind}{training_identity(config)}")})


def finished(config: Config) -> bool:
    """Whether the run already holds a complete checkpoint of its last step, or the recipe's trained G
    (nothing to train)."""
    from dcgan.run.checkpoint import list_checkpoints

    if (Path(config.run.dir) / RECIPE_EXPORT).is_file():
        return True

    done = list_checkpoints(RunDir(Path(config.run.dir)).checkpoints)
    return bool(done) and done[-1][0] >= config.train.steps


class ComparisonStopped(DcganError):
    """A stop signal reached `dcgan compare` while one of its runs trained: the run checkpointed, as `dcgan
    train` does on that signal, and the comparison stopped; the same command resumes it. Exits with the
    status the run did (130 after Ctrl-C, 143 after SIGTERM, 75 after SLURM's warning: requeue me)."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class TrainingFailed(DcganError):
    """A training run of the comparison ended in failure: the line names the setting, the seed, the
    run's exit status and its cause. The settings themselves were valid (they are checked first)."""


def failure_cause(stderr: str) -> str:
    """The line that says why a `dcgan train` child failed: its `dcgan: error:` line, else its last
    logged error (e.g. a non-finite loss), else its last line (a traceback's exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("dcgan: error: ") for line in lines if line.startswith("dcgan: error: ")]
    logged = [
        m.group(1)
        for line in lines
        if (m := re.match(r"\d\d:\d\d:\d\d (?:\[rank \d+\] )?(?:ERROR|CRITICAL) \S+: (.*)", line))
    ]
    return (errors or logged or lines or ["no output on stderr"])[-1]


def wandb_group(root: Path, setting: Setting, config: Config) -> str:
    """The wandb group of a setting's runs: wandb draws a group as its runs' mean with a band over them,
    which is the comparison's curves. Named by the --out directory, the setting and a hash of its training
    config less the seed, so that two comparisons logging to one project never share a group."""
    return f"{root.resolve().name}/{setting.name}-{training_identity(replace(config, seed=0))[:8]}"


def stopped(config: Config, setting: Setting, status: int, signums: list[int]) -> ComparisonStopped:
    """The one line of a comparison stopped by `signums` while `setting`'s run at `config.seed` trained."""
    from dcgan.run.checkpoint import list_checkpoints

    done = list_checkpoints(RunDir(Path(config.run.dir)).checkpoints)
    kept = f"its run kept step {done[-1][0]} of {config.train.steps}" if done else "its run had no checkpoint yet"
    checkpointed = status in (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_REQUEUE)
    return ComparisonStopped(
        f"stopped by {signal.Signals(signums[0]).name} while seed {config.seed} {setting.name} trained: {kept} "
        f"({config.run.dir}); the same command resumes the comparison",
        status if checkpointed else 128 + signums[0],
    )


def train_point(config_path: str, common: list[str], setting: Setting, config: Config, group: str) -> None:
    """Train (or resume) one run in a child process, as `dcgan train` would, in wandb group `group`
    (unless the overrides name another); a finished run is reused."""
    if finished(config):
        return
    command = [
        sys.executable,
        "-m",
        "dcgan",
        "train",
        config_path,
        f"log.group={group}",
        *common,
        *setting.overrides,
        f"seed={config.seed}",
        f"run.dir={config.run.dir}",
    ]
    code, stderr, signums = run_training_child(command)
    if signums:
        raise stopped(config, setting, code, signums)
    if code != 0:
        status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        log = RunDir(Path(config.run.dir)).train_log
        where = f"; log: {log}" if log.is_file() else ""
        raise TrainingFailed(
            f"seed {config.seed} {setting.name}: training {config.run.dir} failed ({status}): {failure_cause(stderr)}{where}"
        )


def default_metric(config: Config) -> str:
    return "digits_frechet" if "digits" in config.eval.metrics or config.uses_builtin_digits else "swd"


def score_point(
    config: Config, metric: str, num: int, info: DistInfo, recipe: bool = False
) -> tuple[float, dict[str, Any]]:
    """`metric` of the generator the point's settings make images with (sample.ema, sample.bn; the
    recipe's: its G with batch statistics)."""
    from dcgan.evaluation.evaluate import evaluate
    from dcgan.evaluation.generators import load_generator

    metrics = sorted({m for m in ("fid", "kid", "swd", "digits") if metric in metric_keys([m])})
    weights = "ema" if config.images_from_average else "raw"
    if recipe:
        loaded = recipe_generator(Path(config.run.dir))
    else:
        loaded = load_generator(Path(config.run.dir), weights=weights, bn=config.sample.bn)
    loaded.generator.to(info.device)
    data = config.eval.data or config.data.shards or "digits"
    evaluation = evaluate(loaded, data, num, metrics, info, config.eval.inception)
    return evaluation.results[metric], evaluation.protocol


@dataclass(frozen=True)
class Comparison:
    metric: str
    lower_is_better: bool
    seeds: list[int]
    settings: dict[str, list[str]]
    values: dict[str, list[float]]
    runs: dict[str, list[str]]
    spreads: dict[str, Spread]
    difference: Spread
    """B - A, paired by seed."""

    def verdict(self) -> str:
        a, b = list(self.settings)
        if self.difference.n < 2:
            return "one seed: no interval, no verdict (use --seeds 3 or more)"
        if not self.difference.excludes_zero():
            return f"no difference resolved at 95% over {self.difference.n} seeds"
        b_lower = self.difference.mean < 0
        better = b if b_lower == self.lower_is_better else a
        return f"{better} is better ({self.metric}, 95% interval of the paired difference excludes 0)"

    def table(self) -> str:
        lines = [f"{self.metric} ({'lower' if self.lower_is_better else 'higher'} is better) over seeds {self.seeds}:"]
        for name, overrides in self.settings.items():
            values = " ".join(f"{v:.4f}" for v in self.values[name])
            lines.append(f"  {name} [{' '.join(overrides) or 'config as is'}]: {self.spreads[name]}   runs: {values}")
        lines.append(f"  B - A (paired): {self.difference}")
        lines.append(f"  verdict: {self.verdict()}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["verdict"] = self.verdict()
        record["table"] = self.table()
        return record


def compare(
    config_path: str,
    common: list[str],
    a: list[str],
    b: list[str],
    seeds: list[int],
    root: Path,
    metric: str = "",
    num: int = 0,
    info: DistInfo | None = None,
) -> Comparison:
    """Train and score both settings at every seed (sequentially, in this machine's processes), writing
    ROOT/compare.json after each seed."""
    from dcgan.distributed.session import init_distributed

    settings = [Setting("A", a), Setting("B", b)]
    base = load_config(config_path, common)
    metric = metric or default_metric(base)
    eligible = metric_keys(["fid", "kid", "swd", "digits"])
    if metric not in eligible:
        raise ConfigError(f"--metric {metric}: must be one of {', '.join(eligible)}")
    info = info or init_distributed(base.train.device, base.dist.timeout_s, liveness_s=base.dist.liveness_s)
    values: dict[str, list[float]] = {s.name: [] for s in settings}
    runs: dict[str, list[str]] = {s.name: [] for s in settings}
    for done, seed in enumerate(seeds, start=1):
        for setting in settings:
            config = point_config(config_path, common, setting, seed, root)
            if not finished(config):
                where = "in this process" if is_recipe(setting) else f"log: {config.run.dir}/train.log"
                print(f"seed {seed} {setting.name}: training {config.run.dir} ({where})", flush=True)
            if is_recipe(setting):
                train_recipe(config, Path(config.run.dir))
            else:
                train_point(config_path, common, setting, config, wandb_group(root, setting, config))
            value, _ = score_point(config, metric, num or config.eval.num, info, recipe=is_recipe(setting))
            values[setting.name].append(value)
            runs[setting.name].append(config.run.dir)
            print(f"seed {seed} {setting.name}: {metric} = {value:.4f}  ({config.run.dir})", flush=True)
        comparison = Comparison(
            metric=metric,
            lower_is_better=metric in LOWER_IS_BETTER,
            seeds=seeds[:done],
            settings={s.name: s.overrides for s in settings},
            values=values,
            runs=runs,
            spreads={name: Spread.of(v) for name, v in values.items()},
            difference=Spread.of([vb - va for va, vb in zip(values["A"], values["B"], strict=True)]),
        )
        write_comparison(comparison, root)  # after every seed: `dcgan report OUT` draws the seeds done so far
    return comparison


def write_comparison(comparison: Comparison, root: Path) -> Path:
    out = root / COMPARISON
    write_text_atomically(out, json.dumps(comparison.as_dict(), indent=1))
    return out


def split_overrides(text: str) -> list[str]:
    """'train.ema=0.999 sample.bn=batch' -> ['train.ema=0.999', 'sample.bn=batch'] (YAML values allowed)."""
    return [part for part in text.split() if part]


def describe_settings(config_path: str, common: list[str], a: list[str], b: list[str]) -> str:
    """What differs between the two settings' configs (checked before any training)."""
    if RECIPE_OVERRIDES in (a, b):
        project = "B" if a == RECIPE_OVERRIDES else "A"
        if a == b:
            raise ConfigError("--a and --b are both the recipe: nothing to compare")
        described = " ".join(b if project == "B" else a) or "the config as is"
        load_config(config_path, [*common, *(b if project == "B" else a)])  # checked before any training
        return (
            f"the pytorch/examples recipe (its G and D, BCE with Sigmoid, Adam, a permutation of all images "
            f"per epoch, batch statistics) vs the project ({project}: {described}), on the same images, seeds, "
            "steps and batch size"
        )
    left = config_to_dict(load_config(config_path, [*common, *a]))
    right = config_to_dict(load_config(config_path, [*common, *b]))
    differing = [
        f"{section}.{key}: {left[section][key]!r} -> {right[section][key]!r}"
        for section in left
        if isinstance(left[section], dict)
        for key in left[section]
        if left[section][key] != right[section][key]
    ]
    if not differing:
        raise ConfigError("--a and --b describe the same config: nothing to compare")
    return "; ".join(differing)
